"""Datasets on disk: the catalog VISSL reads, the built-in digits dataset, CIFAR archives and image folders.

Everything lives under the data root: ``$CONVIT_SSL_DATA``, else ``~/.cache/convit_ssl/data``. The root holds
``dataset_catalog.json`` in VISSL's dataset-catalog format, ``{name: {"train": [images, labels], "val": [images,
labels]}}``; for VISSL's ``disk_folder`` source both entries of a split are the split's folder (class folders of
images, torchvision ``ImageFolder`` layout). The split called ``val`` is the one every evaluation reports on.

Built-in datasets (written on first use, no download):

* ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8 x 8 scans, 10 classes) as RGB PNGs upscaled
  to 32 x 32 (patch sizes 4, 8 and 16 divide it), split 80/20 stratified with seed 0: ``train`` 1,437 images,
  ``val`` the 360 test images.
* ``digits_val``: the training images only, split again 80/20 stratified with seed 0: ``train`` 1,149 images,
  ``val`` 288 held-out training images. Choose recipes on it; report on ``digits``.

``prepare_cifar`` and ``check_image_folder`` turn a CIFAR-10/100 python archive or an ImageNet-layout folder into a
catalog entry (``convit-ssl prepare-data``). ``dataset_manifest.json`` beside the catalog records each dataset's
kind, the data config that fits it and each split's class folders and image count; ``dataset_split_dir`` and
``open_split`` check them, so a changed dataset fails in one line instead of shifting labels.

What this module guarantees: a folder is deleted or replaced only if this module created it (a marker file written
first into it); CIFAR pickles are read by an allow-list unpickler that cannot run code; images are listed and read
checked (``convit_ssl.images``). This module does not import VISSL.
"""
from __future__ import annotations

import codecs
import fcntl
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from convit_ssl import atomic
from convit_ssl.errors import UsageError
from convit_ssl.images import IMAGE_EXTENSIONS, CheckedImageFolder, list_images, unreadable_images

DATA_ENV = "CONVIT_SSL_DATA"
CATALOG_FILE = "dataset_catalog.json"
MANIFEST_FILE = "dataset_manifest.json"  # beside the catalog: what each dataset held when it was registered
SPLITS = ("train", "val")

DIGITS_IMAGE_SIZE = 32
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.2
_DONE = "prepared.json"  # written last into a prepared folder: its presence means the folder is complete
_OURS = ".convit_ssl_folder"  # written first into every folder this module creates: only such folders are deleted
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ---------------------------------------------------------------------------------------------------------------
# Data root and catalog
# ---------------------------------------------------------------------------------------------------------------
def data_root() -> Path:
    """``$CONVIT_SSL_DATA`` if set, else ``~/.cache/convit_ssl/data``."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "convit_ssl" / "data").expanduser()


def catalog_path(root: Optional[Path] = None) -> Path:
    return Path(root or data_root()) / CATALOG_FILE


def _read_json(path: Path, what: str, fix: str) -> dict:
    """The JSON object in ``path`` (empty when there is no file); a ``ValueError`` naming ``what`` and ``fix``."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{what} {path} is not valid JSON ({error}): {fix}") from None


def read_catalog(root: Optional[Path] = None) -> Dict[str, Dict[str, List[str]]]:
    """The catalog as a dict (empty when there is no catalog file yet)."""
    return _read_json(catalog_path(root), "dataset catalog", "fix or delete it and run convit-ssl prepare-data again")


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on the data root, so that concurrent read-modify-writes of the catalog do not lose entries."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".catalog.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_dataset_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a plain name (it becomes a folder name under the data root)."""
    if not _PLAIN_NAME.fullmatch(name or ""):
        raise UsageError(f"dataset name {name!r} is not a plain name: use letters, digits, '_', '-' and '.' (not "
                         f"first), e.g. cifar10")


def manifest_path(root: Optional[Path] = None) -> Path:
    return Path(root or data_root()) / MANIFEST_FILE


def read_manifest(root: Optional[Path] = None) -> Dict[str, dict]:
    """``{name: {"kind", "data_file", "splits": {split: {"classes": [...], "images": N}}}}`` (empty without file)."""
    return _read_json(manifest_path(root), "dataset manifest",
                      "delete it and run convit-ssl prepare-data again for each dataset")


def register_dataset(name: str, train_dir: str | os.PathLike, val_dir: str | os.PathLike,
                     root: Optional[Path] = None, kind: str = "image folder",
                     data_file: Optional[str] = None) -> None:
    """Add or replace catalog entry ``name`` with two ``disk_folder`` splits (absolute paths), and its record in
    the manifest: ``kind``, ``data_file`` (the shipped data config whose crops and statistics fit it) and each
    split's class folders and image count as listed now, which ``dataset_split_dir`` and ``open_split`` check."""
    check_dataset_name(name)
    root = Path(root or data_root())
    folders = {split: Path(folder).resolve() for split, folder in zip(SPLITS, (train_dir, val_dir))}
    splits = {}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise UsageError(f"dataset {name!r}: the {split} folder {folder} does not exist")
        classes, samples = list_images(folder)
        splits[split] = {"classes": classes, "images": len(samples)}
    with _locked(root):
        manifest = read_manifest(root)
        manifest[name] = {"kind": kind, "data_file": data_file, "splits": splits}
        atomic.write_json(manifest, manifest_path(root))
        catalog = read_catalog(root)
        catalog[name] = {split: [str(folder)] * 2 for split, folder in folders.items()}
        atomic.write_json(catalog, catalog_path(root))


# Datasets that need no input: written on first use.
def _builtin_datasets() -> Dict[str, Callable[[Optional[Path]], Path]]:
    return {"digits": ensure_digits, "digits_val": ensure_digits}


def _again(name: str) -> str:
    """The command that registers ``name`` again."""
    return f"convit-ssl prepare-data {name}" + ("" if name in _builtin_datasets() else " --from PATH again")


def _split_folder(name: str, split: str, root: Optional[Path]) -> Path:
    """The folder the catalog names for split ``split`` of ``name`` (built-in datasets written on first use)."""
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    root = Path(root or data_root())
    catalog = read_catalog(root)
    if name in _builtin_datasets() and (name not in catalog or name not in read_manifest(root)):
        _builtin_datasets()[name](root)
        catalog = read_catalog(root)
    if name not in catalog:
        known = sorted(set(catalog) | set(_builtin_datasets()))
        raise UsageError(
            f"unknown dataset {name!r} (catalog {catalog_path(root)}); known: {', '.join(known)}; "
            f"add it with: convit-ssl prepare-data {name} --from PATH"
        )
    folder = Path(catalog[name][split][0])
    if not folder.is_dir():
        raise UsageError(f"dataset {name!r}: the {split} folder {folder} does not exist; prepare it again with "
                         f"{_again(name)} (or restore the folder)")
    return folder


def _record(name: str, root: Optional[Path]) -> dict:
    """The manifest entry of registered dataset ``name``; ``ValueError`` when it has none."""
    record = read_manifest(root).get(name)
    if record is None:
        raise UsageError(f"dataset {name!r} has no record of its classes and images (registered by an older "
                         f"convit-ssl or by hand): run {_again(name)}")
    return record


def _check_record(name: str, split: str, classes: Sequence[str], images: int, root: Optional[Path]) -> None:
    """Raise ``ValueError`` unless the split lists the class folders and image count recorded at registration."""
    record = _record(name, root)["splits"][split]
    if list(classes) != record["classes"]:
        missing = [c for c in record["classes"] if c not in classes]
        added = [c for c in classes if c not in record["classes"]]
        change = "; ".join([f"missing {', '.join(missing[:5])}"] * bool(missing) + [f"new {', '.join(added[:5])}"]
                           * bool(added)) or "reordered"
        raise UsageError(f"dataset {name!r}: the {split} class folders changed since prepare-data ({change}): labels "
                         f"would shift; restore them, or run {_again(name)}")
    if images != record["images"]:
        raise UsageError(f"dataset {name!r}: the {split} split has {images} images, {record['images']} when prepared: "
                         f"files were added or removed; restore them, or run {_again(name)}")


def dataset_split_dir(name: str, split: str, root: Optional[Path] = None) -> Path:
    """Folder of split ``split`` ('train' or 'val') of catalog dataset ``name``, checked against its record.

    The built-in datasets (``digits``, ``digits_val``) are written on first use. Raises ``ValueError`` naming the
    known datasets for an unknown name, the missing folder when the catalog points at nothing, and what changed
    when the split's class folders or image count differ from those recorded by ``prepare-data``.
    """
    folder = _split_folder(name, split, root)
    classes, samples = list_images(folder)
    _check_record(name, split, classes, len(samples), root)
    return folder


def dataset_data_config(name: str, root: Optional[Path] = None) -> Optional[str]:
    """The data config (``data=`` file: crops, statistics, patch size) recorded for dataset ``name`` when it was
    registered: ``digits`` for the built-in datasets, a CIFAR copy's variant, what ``--like`` said for an image
    folder (None when nothing was said)."""
    _split_folder(name, "train", root)  # unknown names fail here; built-in datasets are written
    return _record(name, root)["data_file"]


def open_split(name: str, split: str, transform=None, root: Optional[Path] = None) -> "CheckedImageFolder":
    """The images of split ``split`` of catalog dataset ``name`` as a ``CheckedImageFolder``, checked against the
    record of ``prepare-data`` (see ``dataset_split_dir``)."""
    dataset = CheckedImageFolder(str(_split_folder(name, split, root)), transform=transform)
    _check_record(name, split, dataset.classes, len(dataset), root)
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# Writing image folders
# ---------------------------------------------------------------------------------------------------------------
def _class_folder_names(class_names: Sequence[str]) -> List[str]:
    """Folder names whose sorted order is the label order: '03_cat' (ImageFolder sorts class folders by name)."""
    width = len(str(len(class_names) - 1))
    return [f"{index:0{width}d}_{name}".replace("/", "-") for index, name in enumerate(class_names)]


def _write_split(folder: Path, images: np.ndarray, labels: Sequence[int], class_folders: Sequence[str],
                 names: Sequence[str], progress: Optional[Callable[[int], None]] = None) -> None:
    """Write (N, H, W, 3) uint8 ``images`` as PNGs ``folder/<class folder>/<name>.png``."""
    for class_folder in class_folders:
        (folder / class_folder).mkdir(parents=True, exist_ok=True)
    for image, label, name in zip(images, labels, names):
        Image.fromarray(image).save(folder / class_folders[int(label)] / f"{name}.png")
        if progress:
            progress(1)


def _new_folder(parent: Path, name: str) -> Path:
    """A fresh temporary folder ``parent/.<name>.XXXX.tmp``, marked as created by us before anything goes in."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    (tmp / _OURS).write_text("created by convit-ssl, which alone deletes or replaces this folder\n")
    return tmp


def _is_ours(folder: Path) -> bool:
    """Whether this module created ``folder`` (its marker; completed folders of older versions: prepared.json)."""
    return (folder / _OURS).is_file() or (folder / _DONE).is_file()


def _remove_ours(folder: Path) -> None:
    """Delete ``folder``, which must be one this module created; any other folder is refused."""
    if not _is_ours(folder):
        raise UsageError(f"{folder} was not created by convit-ssl: refusing to delete it")
    shutil.rmtree(folder)


def _is_complete(target: Path, fix: str) -> bool:
    """Whether ``target`` holds a complete prepared copy. Raises ``ValueError`` (``fix`` says what to do) unless
    ``target`` is absent, an empty folder, or a folder of ours: nothing else is ever replaced."""
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a folder: nothing was written; {fix}")
    if not target.exists():
        return False
    if (target / _DONE).is_file():
        return True
    if _is_ours(target) or not any(target.iterdir()):
        return False
    raise UsageError(f"{target} exists, holds files and was not created by convit-ssl: nothing was written or "
                     f"deleted; {fix}")


def _publish(tmp: Path, target: Path, description: dict, fix: str) -> bool:
    """Mark ``tmp`` complete and rename it to ``target``; False if another process published first.

    An incomplete copy of ours at ``target`` is deleted only now, once the new one is complete."""
    atomic.write_json(description, tmp / _DONE)
    if not _is_complete(target, fix) and target.exists() and _is_ours(target):
        _remove_ours(target)
    try:
        os.rename(tmp, target)
        return True
    except OSError as error:  # target exists: a concurrent writer won; its copy is complete, drop ours
        _remove_ours(tmp)
        if not (target / _DONE).is_file():
            raise UsageError(f"could not move the new copy to {target} ({error.strerror}): {fix}") from None
        return False


# ---------------------------------------------------------------------------------------------------------------
# Built-in digits
# ---------------------------------------------------------------------------------------------------------------
def _check_written(target: Path, fix: str) -> None:
    """Raise ``ValueError`` unless every folder of a copy we wrote holds as many images as when it was written."""
    for folder, count in json.loads((target / _DONE).read_text())["counts"].items():
        found = len(list_images(target / folder)[1]) if (target / folder).is_dir() else 0
        if found != count:
            raise UsageError(f"{target / folder} holds {found} images, {count} when convit-ssl wrote it: {fix}")


def _stratified_split(labels: np.ndarray, indices: np.ndarray, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    return train_test_split(indices, test_size=fraction, stratify=labels[indices], random_state=seed)


def ensure_digits(root: Optional[Path] = None) -> Path:
    """Write the digits datasets once and register ``digits`` and ``digits_val``; returns their folder.

    Layout under ``<root>/digits``: ``train`` and ``test`` (the ``digits`` splits), ``val_train`` and ``val_heldout``
    (the ``digits_val`` splits); class folders ``0`` .. ``9``; file ``<index>.png`` with the index of the image in
    ``sklearn.datasets.load_digits``. Safe to call from several processes at once: the folder is built under a
    temporary name and renamed when complete.
    """
    from sklearn.datasets import load_digits

    root = Path(root or data_root())
    target = root / "digits"
    fix = "move it away: convit-ssl writes the built-in digits datasets there"
    if not _is_complete(target, fix):
        bunch = load_digits()
        labels = bunch.target.astype(np.int64)
        gray = np.round(bunch.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # scans are 0..16
        scale = DIGITS_IMAGE_SIZE // gray.shape[-1]
        images = np.repeat(gray.repeat(scale, axis=1).repeat(scale, axis=2)[..., None], 3, axis=-1)
        train, test = _stratified_split(labels, np.arange(len(labels)), DIGITS_TEST_FRACTION, DIGITS_SEED)
        val_train, val_heldout = _stratified_split(labels, np.sort(train), DIGITS_VAL_FRACTION, DIGITS_SEED)
        splits = {"train": train, "test": test, "val_train": val_train, "val_heldout": val_heldout}
        tmp = _new_folder(root, "digits")
        classes = [str(digit) for digit in range(10)]
        for split, indices in splits.items():
            indices = np.sort(indices)
            _write_split(tmp / split, images[indices], labels[indices], classes, [f"{i:04d}" for i in indices])
        _publish(tmp, target, {
            "source": "sklearn.datasets.load_digits", "image_size": DIGITS_IMAGE_SIZE, "seed": DIGITS_SEED,
            "test_fraction": DIGITS_TEST_FRACTION, "val_fraction": DIGITS_VAL_FRACTION,
            "counts": {split: len(indices) for split, indices in splits.items()},
        }, fix)
    catalog, manifest = read_catalog(root), read_manifest(root)
    wanted = {"digits": ("train", "test"), "digits_val": ("val_train", "val_heldout")}
    for name, (train_split, val_split) in wanted.items():
        folders = (target / train_split, target / val_split)
        expected = {split: [str(folder.resolve())] * 2 for split, folder in zip(SPLITS, folders)}
        if catalog.get(name) != expected or name not in manifest:
            _check_written(target, f"delete {target} and run convit-ssl prepare-data digits")
            register_dataset(name, target / train_split, target / val_split, root, kind="digits", data_file="digits")
    return target


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python archives
# ---------------------------------------------------------------------------------------------------------------
# variant -> (train member names, test member name, meta member name, label key, label-names key)
_CIFAR = {
    "cifar-10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"], "test_batch",
                 "batches.meta", "labels", "label_names"),
    "cifar-100": (["train"], "test", "meta", "fine_labels", "fine_label_names"),
}
_CIFAR_FOLDERS = {"cifar-10-batches-py": "cifar-10", "cifar-100-python": "cifar-100"}


# The only globals that CIFAR's python pickles reference (numpy arrays; Python 3 pickles of bytes use
# _codecs.encode): anything else, e.g. os.system, is refused before it can run.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT, ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, bytes, str, numbers and numpy arrays: what CIFAR archives hold."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which CIFAR archives never contain "
                                         f"(refused unrun: it could execute code)")
        return _CIFAR_GLOBALS[module, name]


def _unpickle(stream, where: str) -> dict:
    """A CIFAR batch or meta file (Python 2 pickles with byte-string keys) as a dict with str keys."""
    try:
        data = _CifarUnpickler(stream, encoding="bytes").load()
    except Exception as error:  # any malformed pickle: UnpicklingError, EOFError, ValueError, TypeError, ...
        raise UsageError(f"{where} is not a CIFAR python pickle: {error}; use the original CIFAR archive") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where} holds a {type(data).__name__}, not a CIFAR dict; use the original CIFAR archive")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in data.items()}


def _checked_batch(batch: dict, where: str, label_key: str, num_classes: int) -> Tuple[np.ndarray, List[int]]:
    """(N, 32, 32, 3) uint8 images and N labels of a CIFAR batch; ``ValueError`` naming ``where`` otherwise."""
    data, labels = batch.get("data"), batch.get(label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise UsageError(f"{where}: 'data' is not an (N, 3072) uint8 array, so not a CIFAR batch; use the original "
                         f"CIFAR archive")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(label, int) and 0 <= label < num_classes for label in labels)):
        raise UsageError(f"{where}: {label_key!r} is not {len(data)} labels in 0..{num_classes - 1}, so not a CIFAR "
                         f"batch; use the original CIFAR archive")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextmanager
def _cifar_members(path: Path) -> Iterator[Optional[Tuple[str, Dict[str, Callable[[], dict]]]]]:
    """Yields (variant, {member name: loader}) for a CIFAR python archive or extracted folder, else None."""
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            files = {Path(member.name).as_posix(): member for member in archive.getmembers() if member.isfile()}
            for folder, variant in _CIFAR_FOLDERS.items():
                names = {name.split("/", 1)[1] for name in files if name.startswith(f"{folder}/")}
                if {_CIFAR[variant][1], _CIFAR[variant][2]} <= names:  # the test batch and the meta file
                    yield variant, {name: (lambda member=files[f"{folder}/{name}"]: _unpickle(
                        archive.extractfile(member), f"{path} member {member.name}")) for name in names}
                    return
        yield None
        return
    if path.is_dir():
        for folder in (path, *(path / name for name in _CIFAR_FOLDERS)):
            for variant, (_, test, meta, _, _) in _CIFAR.items():
                if (folder / meta).is_file() and (folder / test).is_file():
                    def load(file: Path) -> dict:
                        with open(file, "rb") as stream:
                            return _unpickle(stream, str(file))
                    yield variant, {file.name: (lambda file=file: load(file)) for file in folder.iterdir()}
                    return
    yield None


def cifar_variant(path: Path) -> Optional[str]:
    """'cifar-10' or 'cifar-100' when ``path`` is a CIFAR python archive or its extracted folder, else None."""
    with _cifar_members(path) as found:
        return None if found is None else found[0]


def prepare_cifar(path: Path, out_dir: Path, progress: bool = True) -> Tuple[Path, Path, Dict[str, int], str]:
    """Write a CIFAR-10/100 python archive (or extracted folder) as PNG folders ``out_dir/{train,val}``.

    Class folders are ``<label>_<name>`` (e.g. ``03_cat``) so ImageFolder's sorted class order is CIFAR's label
    order; files are ``<batch file>_<index in it>.png``. A complete ``out_dir`` written from the same source by an
    earlier run is kept as it is; ``out_dir`` must otherwise be absent, empty or an incomplete copy of ours.
    Returns (train folder, val folder, image counts, variant: 'cifar-10' or 'cifar-100').
    """
    from tqdm import tqdm

    path, out_dir = Path(path).resolve(), Path(out_dir).resolve()
    fix = "pass --out with a new or empty folder"
    if _is_complete(out_dir, fix):
        source = json.loads((out_dir / _DONE).read_text()).get("source")
        if source != str(path):
            raise UsageError(f"{out_dir} already holds a copy of {source}: pass --out with a new folder for {path}, "
                             f"or delete {out_dir} first")
        _check_written(out_dir, f"delete {out_dir} and run convit-ssl prepare-data again")
    else:
        with _cifar_members(path) as found:
            if found is None:
                raise UsageError(f"{path} is not a CIFAR-10/100 python archive or folder")
            variant, members = found
            train_members, test_member, meta_member, label_key, names_key = _CIFAR[variant]
            label_names = members[meta_member]().get(names_key)
            if not isinstance(label_names, list) or not label_names:
                raise UsageError(f"{path}: {meta_member} has no list {names_key!r}, so not a CIFAR archive")
            class_folders = _class_folder_names([_as_text(name) for name in label_names])
            # CIFAR-10 ships five training batches; a cut-down archive with fewer is accepted.
            splits = {"train": [name for name in train_members if name in members], "val": [test_member]}
            if not splits["train"]:
                raise UsageError(f"{path} holds no training batch ({', '.join(train_members)}): not a CIFAR archive")
            batches = {member: _checked_batch(members[member](), f"{path}: {member}", label_key, len(class_folders))
                       for names in splits.values() for member in names}
        per_class = {split: sum(np.bincount(batches[member][1], minlength=len(class_folders)) for member in names)
                     for split, names in splits.items()}
        empty = {split: [class_folders[i] for i in np.flatnonzero(seen == 0)] for split, seen in per_class.items()}
        if any(empty.values()):
            split, names = next((split, names) for split, names in empty.items() if names)
            raise UsageError(f"{path}: the {split} split has no image of class(es) {', '.join(names[:5])}: a class "
                             f"without images would shift every label after it; use the complete archive")
        tmp = _new_folder(out_dir.parent, out_dir.name)
        with tqdm(desc=f"writing {variant} PNGs", unit="img", disable=not progress) as bar:
            for split, names in splits.items():
                for member in names:
                    images, labels = batches[member]
                    files = [f"{member}_{index:05d}" for index in range(len(images))]
                    _write_split(tmp / split, images, labels, class_folders, files, bar.update)
        counts = {split: int(seen.sum()) for split, seen in per_class.items()}
        _publish(tmp, out_dir, {"source": str(path), "variant": variant, "counts": counts}, fix)
    written = json.loads((out_dir / _DONE).read_text())
    return out_dir / "train", out_dir / "val", written["counts"], written["variant"]


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-layout folders
# ---------------------------------------------------------------------------------------------------------------
def check_image_folder(path: Path, progress: bool = True) -> Tuple[Path, Path, Dict[str, int]]:
    """Validate an ImageNet-layout folder (``train/`` and ``val/`` of class folders of images), in place.

    Returns (train folder, val folder, image counts). Raises ``ValueError`` naming the first problem: a missing
    split, no class folders, a link loop, a class folder without images, train and val with different classes
    (labels would not match), or images that PIL cannot read (how many, the first few).
    """
    counts = {}
    classes = {}
    images = []
    for split in SPLITS:
        split_dir = path / split
        if not split_dir.is_dir():
            raise UsageError(f"{path} has no {split}/ folder: expected {path}/train/<class>/<image> and "
                             f"{path}/val/<class>/<image> (ImageNet layout) or a CIFAR python archive")
        classes[split], samples = list_images(split_dir)
        if not classes[split]:
            raise UsageError(f"{split_dir} has no class folders: put the images of each class in a folder of its own")
        per_class = np.bincount([label for _, label in samples], minlength=len(classes[split]))
        empty = [classes[split][index] for index in np.flatnonzero(per_class == 0)]
        if empty:
            raise UsageError(f"{split_dir}: class folder(s) without images: {', '.join(empty[:5])}; image extensions: "
                             f"{' '.join(IMAGE_EXTENSIONS)}")
        counts[split] = len(samples)
        images += [image for image, _ in samples]
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise UsageError(f"{path}: train/ and val/ have different class folders ({', '.join(only[:5])}"
                         f"{', ...' if len(only) > 5 else ''}): labels would not match; give both splits the same "
                         f"classes")
    bad = [os.path.relpath(image, path) for image in unreadable_images(images, progress)]
    if bad:
        raise UsageError(f"{path}: {len(bad)} image(s) that PIL cannot read: {', '.join(bad[:5])}"
                         f"{', ...' if len(bad) > 5 else ''}; delete or replace them and run convit-ssl prepare-data "
                         f"again")
    counts["classes"] = len(classes["train"])
    return path / "train", path / "val", counts


def prepare_dataset(name: str, source: Path, out_dir: Optional[Path] = None, progress: bool = True,
                    root: Optional[Path] = None, like: Optional[str] = None) -> Dict[str, object]:
    """Register ``source`` (CIFAR archive/folder, or ImageNet-layout folder) as catalog dataset ``name``.

    CIFAR is written as PNGs to ``out_dir`` (default ``<data root>/<name>``) and read with the data config of its
    variant (``cifar10``, ``cifar100``); an image folder is registered in place, read with data config ``like``
    (default: ``name`` when a data config has that name, else none). Returns a description: kind, train and val
    folders, counts, data config. Every check comes before anything is written.
    """
    from convit_ssl.engine import data_config_names

    check_dataset_name(name)
    if name in _builtin_datasets():
        raise UsageError(f"{name!r} is a built-in dataset (written by convit-ssl prepare-data {name}, no --from): "
                         f"register yours under another name")
    configs = data_config_names()
    if like is not None and like not in configs:
        raise UsageError(f"--like {like!r} is not a data config; choose from {', '.join(configs)}")
    source = Path(source).expanduser()
    if not source.exists():
        raise UsageError(f"--from {source} does not exist: pass an ImageNet-layout folder or a CIFAR python archive")
    variant = cifar_variant(source)
    if variant is None and not source.is_dir():
        raise UsageError(f"{source} is neither a folder with train/ and val/ class folders nor a CIFAR-10/100 python "
                         f"archive (cifar-10-python.tar.gz, cifar-100-python.tar.gz or their extracted folder)")
    if variant is not None and like is not None and like != variant.replace("-", ""):
        raise UsageError(f"--like is for image folders: a CIFAR copy is read with its variant's data config, "
                         f"{variant.replace('-', '')}; drop --like")
    data_file = variant.replace("-", "") if variant else like or (name if name in configs else None)
    if name in configs and data_file != name:
        fits = f"register it as {data_file} or under another name" if data_file else "register it under another name"
        raise UsageError(f"{name!r} names the data config {name}, which does not fit this {variant or 'image folder'} "
                         f"copy: {fits}")
    root = Path(root or data_root())
    if variant is not None:
        train_dir, val_dir, counts, kind = prepare_cifar(source, Path(out_dir or root / name), progress=progress)
    else:
        train_dir, val_dir, counts = check_image_folder(source, progress=progress)
        kind = "image folder"
    register_dataset(name, train_dir, val_dir, root, kind=kind, data_file=data_file)
    return {"name": name, "kind": kind, "train": str(train_dir), "val": str(val_dir), "counts": counts,
            "data_file": data_file}
