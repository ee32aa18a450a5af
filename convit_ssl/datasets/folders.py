"""Dataset folders that convit-ssl writes: built whole under a temporary name, then published by one rename.

Every folder is marked as ours (``OURS_MARKER``) before anything goes into it, and only marked folders are ever
deleted or replaced. ``DONE_FILE`` (``prepared.json``) is written last, with what the folder holds (its source and
each split's image count): its presence means the folder is complete. Images are written as PNGs in class folders
(torchvision ``ImageFolder`` layout). Used by the digits and CIFAR writers; no VISSL import.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image

from convit_ssl import atomic
from convit_ssl.errors import UsageError
from convit_ssl.images import list_images

DONE_FILE = "prepared.json"  # written last into a prepared folder: its presence means the folder is complete
OURS_MARKER = ".convit_ssl_folder"  # written first into every folder we create: only such folders are deleted


def class_folder_names(class_names: Sequence[str]) -> List[str]:
    """Folder names whose sorted order is the label order: '03_cat' (ImageFolder sorts class folders by name)."""
    width = len(str(len(class_names) - 1))
    return [f"{index:0{width}d}_{name}".replace("/", "-") for index, name in enumerate(class_names)]


def write_split(folder: Path, images: np.ndarray, labels: Sequence[int], class_folders: Sequence[str],
                 names: Sequence[str], progress: Optional[Callable[[int], None]] = None) -> None:
    """Write (N, H, W, 3) uint8 ``images`` as PNGs ``folder/<class folder>/<name>.png``."""
    for class_folder in class_folders:
        (folder / class_folder).mkdir(parents=True, exist_ok=True)
    for image, label, name in zip(images, labels, names):
        Image.fromarray(image).save(folder / class_folders[int(label)] / f"{name}.png")
        if progress:
            progress(1)


def new_folder(parent: Path, name: str) -> Path:
    """A fresh temporary folder ``parent/.<name>.XXXX.tmp``, marked as created by us before anything goes in."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    (tmp / OURS_MARKER).write_text("created by convit-ssl, which alone deletes or replaces this folder\n")
    return tmp


def is_ours(folder: Path) -> bool:
    """Whether convit-ssl created ``folder`` (its marker; completed folders of older versions: prepared.json)."""
    return (folder / OURS_MARKER).is_file() or (folder / DONE_FILE).is_file()


def remove_ours(folder: Path) -> None:
    """Delete ``folder``, which must be one convit-ssl created; any other folder is refused."""
    if not is_ours(folder):
        raise UsageError(f"{folder} was not created by convit-ssl: refusing to delete it")
    shutil.rmtree(folder)


def is_complete(target: Path, fix: str) -> bool:
    """Whether ``target`` holds a complete prepared copy. Raises ``ValueError`` (``fix`` says what to do) unless
    ``target`` is absent, an empty folder, or a folder of ours: nothing else is ever replaced."""
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a folder: nothing was written; {fix}")
    if not target.exists():
        return False
    if (target / DONE_FILE).is_file():
        return True
    if is_ours(target) or not any(target.iterdir()):
        return False
    raise UsageError(f"{target} exists, holds files and was not created by convit-ssl: nothing was written or "
                     f"deleted; {fix}")


def publish(tmp: Path, target: Path, description: dict, fix: str) -> bool:
    """Mark ``tmp`` complete and rename it to ``target``; False if another process published first.

    An incomplete copy of ours at ``target`` is deleted only now, once the new one is complete."""
    atomic.write_json(description, tmp / DONE_FILE)
    if not is_complete(target, fix) and target.exists() and is_ours(target):
        remove_ours(target)
    try:
        os.rename(tmp, target)
        return True
    except OSError as error:  # target exists: a concurrent writer won; its copy is complete, drop ours
        remove_ours(tmp)
        if not (target / DONE_FILE).is_file():
            raise UsageError(f"could not move the new copy to {target} ({error.strerror}): {fix}") from None
        return False


def check_written(target: Path, fix: str) -> None:
    """Raise ``ValueError`` unless every folder of a copy we wrote holds as many images as when it was written."""
    for folder, count in json.loads((target / DONE_FILE).read_text())["counts"].items():
        found = len(list_images(target / folder)[1]) if (target / folder).is_dir() else 0
        if found != count:
            raise UsageError(f"{target / folder} holds {found} images, {count} when convit-ssl wrote it: {fix}")
