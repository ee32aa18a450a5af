"""Datasets on disk: the data root and the catalog VISSL reads, the built-in datasets and ``prepare-data``.

Everything lives under the data root: ``$CONVIT_SSL_DATA``, else ``~/.cache/convit_ssl/data``. The root holds
``dataset_catalog.json`` in VISSL's dataset-catalog format, ``{name: {"train": [images, labels], "val": [images,
labels]}}``; for VISSL's ``disk_folder`` source both entries of a split are the split's folder (class folders of
images, torchvision ``ImageFolder`` layout). The split called ``val`` is the one every evaluation reports on.

Built-in datasets (written on first use by ``convit_ssl.datasets.digits``, no download):

* ``digits``: scikit-learn's handwritten digits as 32 x 32 PNGs: ``train`` 1,437 images, ``val`` the 360 test images.
* ``digits_val``: the training images only, split again 80/20 stratified with seed 0: ``train`` 1,149 images,
  ``val`` 288 held-out training images. Choose recipes on it; report on ``digits``.

``prepare_dataset`` registers a CIFAR-10/100 python archive (written as PNGs by ``convit_ssl.datasets.cifar``) or an
ImageNet-layout folder (checked in place by ``check_image_folder``) as a catalog entry (``convit-ssl prepare-data``).
``dataset_manifest.json`` beside the catalog records each dataset's kind, the data config that fits it and each
split's class folders and image count; ``dataset_split_dir`` and ``open_split`` check them, so a changed dataset
fails in one line instead of shifting labels.

What this module and ``convit_ssl.datasets`` guarantee: a folder is deleted or replaced only if convit-ssl created
it (``datasets.folders``); CIFAR pickles are read by an allow-list unpickler that cannot run code; images are
listed and read checked (``convit_ssl.images``). No VISSL import.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from convit_ssl import atomic
from convit_ssl.datasets.cifar import cifar_variant, prepare_cifar
from convit_ssl.datasets.digits import DIGITS_SPLITS, write_digits
from convit_ssl.datasets.folders import check_written
from convit_ssl.errors import UsageError
from convit_ssl.images import IMAGE_EXTENSIONS, UNSCALED_PIXELS, CheckedImageFolder, list_images, unreadable_images
from convit_ssl.shipped_configs import data_config_names

DATA_ENV = "CONVIT_SSL_DATA"
CATALOG_FILE = "dataset_catalog.json"
MANIFEST_FILE = "dataset_manifest.json"  # beside the catalog: what each dataset held when it was registered
SPLITS = ("train", "val")
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
# Built-in digits
# ---------------------------------------------------------------------------------------------------------------
def ensure_digits(root: Optional[Path] = None) -> Path:
    """Write the digits datasets once (``datasets.digits.write_digits``) and register ``digits`` and ``digits_val``;
    returns their folder. Safe to call from several processes at once."""
    root = Path(root or data_root())
    target = write_digits(root)
    catalog, manifest = read_catalog(root), read_manifest(root)
    for name, (train_split, val_split) in DIGITS_SPLITS.items():
        folders = (target / train_split, target / val_split)
        expected = {split: [str(folder.resolve())] * 2 for split, folder in zip(SPLITS, folders)}
        if catalog.get(name) != expected or name not in manifest:
            check_written(target, f"delete {target} and run convit-ssl prepare-data digits")
            register_dataset(name, target / train_split, target / val_split, root, kind="digits", data_file="digits")
    return target


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-layout folders
# ---------------------------------------------------------------------------------------------------------------
def check_image_folder(path: Path, progress: bool = True) -> Tuple[Path, Path, Dict[str, int], List[str]]:
    """Validate an ImageNet-layout folder (``train/`` and ``val/`` of class folders of images), in place.

    Returns (train folder, val folder, image counts, the files left out: no image extension, or beside the class
    folders; relative to ``path``). Raises ``ValueError`` naming the first problem: a missing
    split, no class folders, a link loop, a class folder without images, train and val with different classes
    (labels would not match), val images that are train images (through links), or images that PIL cannot read
    or that have 32-bit or float pixels (how many, the first few).
    """
    counts = {}
    classes = {}
    images = {}
    left_out: List[str] = []
    for split in SPLITS:
        split_dir = path / split
        if not split_dir.is_dir():
            raise UsageError(f"{path} has no {split}/ folder: expected {path}/train/<class>/<image> and "
                             f"{path}/val/<class>/<image> (ImageNet layout) or a CIFAR python archive")
        classes[split], samples = list_images(split_dir, left_out)
        if not classes[split]:
            raise UsageError(f"{split_dir} has no class folders: put the images of each class in a folder of its own")
        per_class = np.bincount([label for _, label in samples], minlength=len(classes[split]))
        empty = [classes[split][index] for index in np.flatnonzero(per_class == 0)]
        if empty:
            raise UsageError(f"{split_dir}: class folder(s) without images: {', '.join(empty[:5])}; image extensions: "
                             f"{' '.join(IMAGE_EXTENSIONS)}")
        counts[split] = len(samples)
        images[split] = [image for image, _ in samples]
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise UsageError(f"{path}: train/ and val/ have different class folders ({', '.join(only[:5])}"
                         f"{', ...' if len(only) > 5 else ''}): labels would not match; give both splits the same "
                         f"classes")
    in_train = {os.path.realpath(image) for image in images["train"]}
    shared = [os.path.relpath(image, path) for image in images["val"] if os.path.realpath(image) in in_train]
    if shared:  # a link into train/: every evaluation would score training images
        raise UsageError(f"{path}: train/ and val/ share {len(shared)} image(s) ({', '.join(shared[:3])}"
                         f"{', ...' if len(shared) > 3 else ''}, through links): give val/ images of its own")
    bad, unscaled = ([os.path.relpath(image, path) for image in found]
                     for found in unreadable_images(images["train"] + images["val"], progress))
    if bad:
        raise UsageError(f"{path}: {len(bad)} image(s) that PIL cannot read: {', '.join(bad[:5])}"
                         f"{', ...' if len(bad) > 5 else ''}; delete or replace them and run convit-ssl prepare-data "
                         f"again")
    if unscaled:  # PIL's RGB conversion would clip them: mostly white
        raise UsageError(f"{path}: {len(unscaled)} image(s) with {UNSCALED_PIXELS}: {', '.join(unscaled[:5])}"
                         f"{', ...' if len(unscaled) > 5 else ''}, which RGB conversion clips; save them with 8 bits "
                         f"per channel and run convit-ssl prepare-data again")
    counts["classes"] = len(classes["train"])
    return path / "train", path / "val", counts, [os.path.relpath(file, path) for file in left_out]


def prepare_dataset(name: str, source: Path, out_dir: Optional[Path] = None, progress: bool = True,
                    root: Optional[Path] = None, like: Optional[str] = None) -> Dict[str, object]:
    """Register ``source`` (CIFAR archive/folder, or ImageNet-layout folder) as catalog dataset ``name``.

    CIFAR is written as PNGs to ``out_dir`` (default ``<data root>/<name>``) and read with the data config of its
    variant (``cifar10``, ``cifar100``); an image folder is registered in place, read with data config ``like``
    (default: ``name`` when a data config has that name, else none). Returns a description: kind, train and val
    folders, counts, data config, the files of an image folder left out (not images of the dataset). Every check
    comes before anything is written.
    """
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
        left_out = []
    else:
        train_dir, val_dir, counts, left_out = check_image_folder(source, progress=progress)
        kind = "image folder"
    register_dataset(name, train_dir, val_dir, root, kind=kind, data_file=data_file)
    return {"name": name, "kind": kind, "train": str(train_dir), "val": str(val_dir), "counts": counts,
            "data_file": data_file, "left_out": left_out}
