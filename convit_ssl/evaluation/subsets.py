"""Per-class label subsets for low-data studies, and the held-out split that probes select on.

Two rules pick the images of a class that a fraction f keeps:

* ``"random"`` (default): each class's images in an order drawn from ``seed`` and the class index alone, the first
  ``max(1, floor(n_c * f))`` of them. Smaller fractions are prefixes of larger ones, so subsets are nested for one
  seed, and every class keeps at least one image.
* ``"first"``: the official ConViT code's ``--sampling_ratio`` rule, the first ``int(n_c * f)`` files of each class
  in sorted file-name order (no minimum: a class with ``n_c * f < 1`` is dropped, as there). Nested too.

Indices refer to the dataset's sample order and come back sorted.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from convit_ssl.errors import UsageError

FRACTIONS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0)
RULES = ("random", "first")


def _class_indices(labels: np.ndarray) -> Dict[int, np.ndarray]:
    return {int(label): np.flatnonzero(labels == label) for label in np.unique(labels)}


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise UsageError(f"label fraction {fraction} is outside (0, 1]: pass e.g. 0.01 for 1% of the labels")


def class_subset(labels: Sequence[int], fraction: float, seed: int = 0, rule: str = "random",
                 filenames: Optional[Sequence[str]] = None) -> np.ndarray:
    """Sorted indices of the images that ``fraction`` of each class keeps (see the module docstring).

    ``rule="first"`` needs ``filenames`` (one per sample; sorted within each class to pick the first ones). A
    subset without any image is an error.
    """
    _check_fraction(fraction)
    if rule not in RULES:
        raise UsageError(f"unknown subset rule {rule!r}: use one of {', '.join(RULES)}")
    labels = np.asarray(labels)
    chosen = []
    for label, indices in _class_indices(labels).items():
        if rule == "random":
            order = np.random.default_rng([seed, label]).permutation(indices)
            count = max(1, math.floor(len(indices) * fraction + 1e-9))
        else:
            if filenames is None:
                raise ValueError("the 'first' subset rule needs the file names of the samples")
            order = indices[np.argsort([filenames[i] for i in indices], kind="stable")]
            count = int(len(indices) * fraction)
        chosen.append(order[:count])
    if not sum(len(part) for part in chosen):
        largest = max((len(indices) for indices in _class_indices(labels).values()), default=0)
        raise UsageError(f"label fraction {fraction:g} keeps no training image under the 'first' rule (int(n * f) = 0 "
                         f"for every class, the largest holds {largest}): raise it to at least 1/{largest}, or use "
                         f"--subset-rule random (at least one image per class)")
    return np.sort(np.concatenate(chosen))


def nested_subsets(labels: Sequence[int], fractions: Sequence[float] = FRACTIONS, seed: int = 0,
                   rule: str = "random", filenames: Optional[Sequence[str]] = None) -> Dict[float, np.ndarray]:
    """``{fraction: indices}`` for several fractions; each is a subset of every larger one."""
    return {fraction: class_subset(labels, fraction, seed, rule, filenames) for fraction in sorted(fractions)}


def heldout_split(labels: Sequence[int], fraction: float, seed: int = 0,
                  indices: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) split of ``indices`` (default: all samples), both sorted.

    Each class gives ``n_c * fraction`` images, rounded half up and at least one, to the held-out part, but always
    keeps one for training: a class with a single image gives none. ``fraction=0`` holds nothing out.
    """
    labels = np.asarray(labels)
    indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
    if not 0 <= fraction < 1:
        raise UsageError(f"held-out fraction {fraction} is outside [0, 1): pass e.g. 0.1")
    train, heldout = [], []
    for label, members in _class_indices(labels[indices]).items():
        members = np.random.default_rng([seed, label, 1]).permutation(indices[members])
        count = 0 if fraction == 0 else min(len(members) - 1, max(1, math.floor(len(members) * fraction + 0.5)))
        heldout.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout)).astype(np.int64)
