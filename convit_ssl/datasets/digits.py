"""The built-in digits datasets: scikit-learn's bundled handwritten digits written as PNG folders (no download).

1,797 real 8 x 8 scans, 10 classes, as RGB PNGs upscaled to ``DIGITS_IMAGE_SIZE`` = 32 (patch sizes 4, 8 and 16
divide it), split 80/20 stratified with seed 0 (``train`` 1,437, ``test`` 360); the training images split again
80/20 (``val_train`` 1,149, ``val_heldout`` 288). ``convit_ssl.data`` registers them as ``digits`` and
``digits_val``. No VISSL import.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from convit_ssl.datasets.folders import is_complete, new_folder, publish, write_split

DIGITS_IMAGE_SIZE = 32
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.2
# split name of each catalog entry: (its train split, its val split)
DIGITS_SPLITS = {"digits": ("train", "test"), "digits_val": ("val_train", "val_heldout")}


def _stratified_split(labels: np.ndarray, indices: np.ndarray, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    return train_test_split(indices, test_size=fraction, stratify=labels[indices], random_state=seed)


def write_digits(root: Path) -> Path:
    """Write the digits datasets once into ``<root>/digits`` (nothing when a complete copy is there); returns it.

    Layout under ``<root>/digits``: ``train`` and ``test`` (the ``digits`` splits), ``val_train`` and ``val_heldout``
    (the ``digits_val`` splits); class folders ``0`` .. ``9``; file ``<index>.png`` with the index of the image in
    ``sklearn.datasets.load_digits``. Safe to call from several processes at once: the folder is built under a
    temporary name and renamed when complete.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    target = root / "digits"
    fix = "move it away: convit-ssl writes the built-in digits datasets there"
    if not is_complete(target, fix):
        bunch = load_digits()
        labels = bunch.target.astype(np.int64)
        gray = np.round(bunch.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # scans are 0..16
        scale = DIGITS_IMAGE_SIZE // gray.shape[-1]
        images = np.repeat(gray.repeat(scale, axis=1).repeat(scale, axis=2)[..., None], 3, axis=-1)
        train, test = _stratified_split(labels, np.arange(len(labels)), DIGITS_TEST_FRACTION, DIGITS_SEED)
        val_train, val_heldout = _stratified_split(labels, np.sort(train), DIGITS_VAL_FRACTION, DIGITS_SEED)
        splits = {"train": train, "test": test, "val_train": val_train, "val_heldout": val_heldout}
        tmp = new_folder(root, "digits")
        classes = [str(digit) for digit in range(10)]
        for split, indices in splits.items():
            indices = np.sort(indices)
            write_split(tmp / split, images[indices], labels[indices], classes, [f"{i:04d}" for i in indices])
        publish(tmp, target, {
            "source": "sklearn.datasets.load_digits", "image_size": DIGITS_IMAGE_SIZE, "seed": DIGITS_SEED,
            "test_fraction": DIGITS_TEST_FRACTION, "val_fraction": DIGITS_VAL_FRACTION,
            "counts": {split: len(indices) for split, indices in splits.items()},
        }, fix)
    return target
