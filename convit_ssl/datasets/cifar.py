"""CIFAR-10 / CIFAR-100 python archives (or their extracted folders) written as PNG folders, read safely.

The pickles inside are read by an allow-list unpickler that cannot run code (``_CifarUnpickler``); every batch is
checked (shape, dtype, labels) before anything is written. No VISSL import.
"""
from __future__ import annotations

import codecs
import json
import pickle
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from convit_ssl.datasets.folders import (DONE_FILE, check_written, class_folder_names, is_complete, new_folder,
                                         publish, write_split)
from convit_ssl.errors import UsageError

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
    if is_complete(out_dir, fix):
        source = json.loads((out_dir / DONE_FILE).read_text()).get("source")
        if source != str(path):
            raise UsageError(f"{out_dir} already holds a copy of {source}: pass --out with a new folder for {path}, "
                             f"or delete {out_dir} first")
        check_written(out_dir, f"delete {out_dir} and run convit-ssl prepare-data again")
    else:
        with _cifar_members(path) as found:
            if found is None:
                raise UsageError(f"{path} is not a CIFAR-10/100 python archive or folder")
            variant, members = found
            train_members, test_member, meta_member, label_key, names_key = _CIFAR[variant]
            label_names = members[meta_member]().get(names_key)
            if not isinstance(label_names, list) or not label_names:
                raise UsageError(f"{path}: {meta_member} has no list {names_key!r}, so not a CIFAR archive")
            class_folders = class_folder_names([_as_text(name) for name in label_names])
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
        tmp = new_folder(out_dir.parent, out_dir.name)
        with tqdm(desc=f"writing {variant} PNGs", unit="img", disable=not progress) as bar:
            for split, names in splits.items():
                for member in names:
                    images, labels = batches[member]
                    files = [f"{member}_{index:05d}" for index in range(len(images))]
                    write_split(tmp / split, images, labels, class_folders, files, bar.update)
        counts = {split: int(seen.sum()) for split, seen in per_class.items()}
        publish(tmp, out_dir, {"source": str(path), "variant": variant, "counts": counts}, fix)
    written = json.loads((out_dir / DONE_FILE).read_text())
    return out_dir / "train", out_dir / "val", written["counts"], written["variant"]
