"""Image folders listed and read checked: no link loops, and an unreadable file is named (one line).

``list_images`` lists a split folder as torchvision's ``ImageFolder`` does, reading every real folder once;
``read_image`` opens a file as RGB or raises ``UnreadableImage`` naming it; ``CheckedImageFolder`` is an
``ImageFolder`` made of both (the evaluations read with it, and VISSL's ``disk_folder`` datasets through
``convit_ssl.vissl_glue``); ``unreadable_images`` finds the files that PIL cannot verify and those ``read_image``
refuses (``prepare-data``).

PIL's RGB conversion clips the pixels of 16-bit grey images (mode I;16: a 16-bit grey PNG turns white) where it
scales 16-bit colour ones to 8 bits: ``read_image`` scales I;16 by 1/256 too. 32-bit integer (I) and float (F)
pixels have no known full scale, so they are refused (``UNSCALED_MODES``).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder

from convit_ssl.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned 16-bit grey: read scaled to 8 bits
UNSCALED_MODES = ("I", "F")  # 32-bit integer and float pixels: no full scale to map to 8 bits
UNSCALED_PIXELS = "32-bit or float pixels"


def list_images(split_dir: str | os.PathLike,
                left_out: Optional[List[str]] = None) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(class names, [(image path, label)]) of a split folder, in torchvision ``ImageFolder``'s order.

    Classes are the sub-folders (sorted; links followed), images the files with an image extension anywhere below
    them. Every real folder is read once: a link to a folder already read (a loop, or a second way into it) raises
    ``ValueError`` naming the link, where ``ImageFolder`` would read the same images again and again. The paths of
    the other files (no image extension, or beside the class folders) are appended to ``left_out`` when given.
    """
    split_dir = os.fspath(split_dir)
    stat = os.stat(split_dir)
    seen = {(stat.st_dev, stat.st_ino)}
    entries = sorted(os.scandir(split_dir), key=lambda entry: entry.name)
    classes = [entry.name for entry in entries if entry.is_dir()]
    others = [entry.path for entry in entries if not entry.is_dir()]
    samples: List[Tuple[str, int]] = []
    for label, name in enumerate(classes):
        folders = []
        for folder, _, files in os.walk(os.path.join(split_dir, name), followlinks=True):
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in seen:
                raise UsageError(f"{folder} leads back to a folder already read (a symbolic link loop, or a second "
                                 f"link to it): remove the link, or its images would be read more than once")
            seen.add((stat.st_dev, stat.st_ino))
            taken = [file.lower().endswith(IMAGE_EXTENSIONS) for file in files]
            folders.append((folder, sorted(file for file, image in zip(files, taken) if image)))
            others += sorted(os.path.join(folder, file) for file, image in zip(files, taken) if not image)
        samples += [(os.path.join(folder, file), label) for folder, files in sorted(folders) for file in files]
    if left_out is not None:
        left_out += others
    return classes, samples


class UnreadableImage(UsageError):
    """An image file that PIL cannot read; the message names it.

    A DataLoader worker's exception comes back to the main process with the worker's traceback in its message:
    ``str()`` keeps the one line that names the file.
    """

    def __str__(self) -> str:
        return super().__str__().strip().splitlines()[-1].rpartition("UnreadableImage: ")[2]


DATASET_IMAGE_FIX = "delete or replace it, then run convit-ssl prepare-data again"


def read_image(path: str | os.PathLike, fix: str = DATASET_IMAGE_FIX) -> Image.Image:
    """The image at ``path`` as RGB (16-bit grey scaled to 8 bits); ``UnreadableImage`` naming the file and ``fix``
    when it is missing, PIL cannot read it, or its pixels are 32-bit or float (``UNSCALED_MODES``)."""
    try:
        with open(path, "rb") as stream:
            image = Image.open(stream)
            if image.mode in SIXTEEN_BIT_MODES:
                return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8)).convert("RGB")
            if image.mode not in UNSCALED_MODES:
                return image.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImage(f"image {path} does not exist; {fix}") from None
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise UnreadableImage(f"cannot read image {path} ({type(error).__name__}: {error}); {fix}") from None
    raise UnreadableImage(f"image {path} has {UNSCALED_PIXELS} (PIL mode {image.mode}), which RGB conversion clips: "
                          f"save it with 8 bits per channel; {fix}")


class CheckedImageFolder(ImageFolder):
    """torchvision's ``ImageFolder`` listed by ``list_images`` (no link loops) and read by ``read_image`` (errors
    name the file). VISSL's ``disk_folder`` datasets use it too (see ``convit_ssl.vissl_glue``)."""

    def __init__(self, root: str, transform=None, target_transform=None, loader=read_image, **options):
        super().__init__(root, transform=transform, target_transform=target_transform, loader=loader, **options)

    def find_classes(self, directory):
        classes, self._listed = list_images(directory)
        return classes, {name: index for index, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return self._listed


def unreadable_images(paths: Sequence[str], progress: bool = False) -> Tuple[List[str], List[str]]:
    """(the files among ``paths`` that PIL cannot open and verify, those with 32-bit or float pixels, which
    ``read_image`` refuses)."""
    from tqdm import tqdm

    bad, unscaled = [], []
    for path in tqdm(paths, desc="checking images", unit="img", disable=not progress):
        try:
            with Image.open(path) as image:
                image.verify()
                if image.mode in UNSCALED_MODES:
                    unscaled.append(path)
        except Exception:  # what PIL raises for a file it cannot read
            bad.append(path)
    return bad, unscaled
