"""Features of a frozen trunk over a dataset split: one pass for several feature keys, optionally cached on disk.

A *feature choice* is a trunk ``out_feat_keys`` key (``lastCLS``, ``lastPOOL``, ``concatCLS<n>``,
``concatPOOL<n>``, ``blkCLS<i>``, ``blkPOOL<i>``) or several joined by ``+``: ``lastCLS+lastPOOL`` is the final
class token concatenated with the mean of the final patch tokens. The trunk runs once per batch for all the keys
that the choices need, in eval mode under ``torch.no_grad``; its training flag is restored afterwards.

Images go through ``Preprocess.eval_transform`` (resize, centre crop, the trunk's normalisation).

Several processes (``distributed``): each rank extracts its shard of the split (``distributed.shard_indices``) and
the rows of all ranks are gathered in dataset order, so every rank ends with the whole split's features.

Cache layout (``cache_dir``): one folder per (trunk weights, dataset split, image transform), named by a hash of
its description (not of the world size), holding ``meta.json`` (that description, a digest of the split's files
with their sizes and times, the checkpoint it came from, feature sizes, the number of shards of each key) and the
arrays of each trunk key: ``<key>.npy`` (all rows in the split's sample order) when one process wrote it, else
``<key>.shard-<r>-of-<W>.npy`` from each rank r of W, holding samples r, r + W, r + 2W, ... (labels come from the
folder). Any world size reads either layout. Arrays are written through a numpy memmap, each by the rank that
extracted it, and renamed when complete; rank 0 writes ``meta.json`` once every shard is in place. Later calls
memory-map a single array (or assemble the shards in memory) and compute only missing keys, or all of them again
when the files have changed. A killed writer's temporary arrays are deleted by the next call on the same host.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset

from convit_ssl import atomic
from convit_ssl.evaluation import distributed
from convit_ssl.data import open_split
from convit_ssl.errors import UsageError
from convit_ssl.models.modes import eval_mode
from convit_ssl.shipped_configs import DATA_CONFIG_DIR


def data_statistics(name: str) -> Dict[str, List[float]]:
    """``mean`` and ``std`` of the data config ``name`` (``configs/config/convit_ssl/data/NAME.yaml``), the one
    place that states a dataset's statistics."""
    import yaml

    path = DATA_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DATA_CONFIG_DIR.glob("*.yaml")))
        raise UsageError(f"normalisation {name!r} names no data file; known: {known}")
    section = yaml.safe_load(path.read_text())["config"]["CONVIT_SSL"]
    return {"mean": section["MEAN"], "std": section["STD"]}


@functools.lru_cache(maxsize=None)
def imagenet_statistics() -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """ImageNet's (mean, std) from ``data/imagenet1k.yaml``, read at the first call (importing reads no file): the
    normalisation of trunks and runs that do not say theirs."""
    statistics = data_statistics("imagenet1k")
    return tuple(statistics["mean"]), tuple(statistics["std"])


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How images become trunk inputs; use the normalisation the trunk was trained with.

    Evaluation: bicubic resize of the short side to ``image_size / crop_ratio``, centre crop to ``image_size``,
    normalisation by ``mean`` and ``std`` (``crop_ratio=0.875`` is the usual 256 -> 224; 1 keeps the whole image).
    Training of streamed probes adds augmentation: a random resized crop (DINO's: 8-100% of the area) and a flip.
    """

    image_size: int
    crop_ratio: float = 0.875
    mean: Tuple[float, float, float] = field(default_factory=lambda: imagenet_statistics()[0])
    std: Tuple[float, float, float] = field(default_factory=lambda: imagenet_statistics()[1])

    def eval_transform(self):
        from torchvision import transforms as T

        return T.Compose([
            T.Resize(round(self.image_size / self.crop_ratio), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def train_transform(self, crop_scale: Tuple[float, float] = (0.08, 1.0), hflip: bool = True):
        """Random resized crop covering ``crop_scale`` of the image area, optional horizontal flip, normalisation."""
        from torchvision import transforms as T

        return T.Compose([
            T.RandomResizedCrop(self.image_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC),
            *([T.RandomHorizontalFlip()] if hflip else []),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])


def image_folder(dataset: str, split: str, transform=None):
    """A torchvision ``ImageFolder`` of a catalog dataset split ('train' or 'val'), checked against what
    ``prepare-data`` recorded; errors name an image that cannot be read (``convit_ssl.data.open_split``)."""
    return open_split(dataset, split, transform)


# ---------------------------------------------------------------------------------------------------------------
# Feature choices
# ---------------------------------------------------------------------------------------------------------------
def trunk_keys(choices: Sequence[str]) -> List[str]:
    """The trunk keys that ``choices`` need, each once, in first-use order."""
    keys: List[str] = []
    for choice in choices:
        parts = choice.split("+")
        if not all(parts):
            raise UsageError(f"feature choice {choice!r} has an empty part: join keys with '+', e.g. lastCLS+lastPOOL")
        keys.extend(part for part in parts if part not in keys)
    return keys


def check_feature_choices(trunk: nn.Module, choices: Sequence[str], image_size: int) -> Dict[str, int]:
    """Feature size of each choice, from one forward pass of a blank image; raises the trunk's error for a bad key."""
    keys = trunk_keys(choices)
    device = next(trunk.parameters()).device
    with torch.no_grad(), eval_mode(trunk):
        outputs = trunk(torch.zeros(1, 3, image_size, image_size, device=device), out_feat_keys=keys)
    sizes = {key: output.shape[-1] for key, output in zip(keys, outputs)}
    return {choice: sum(sizes[key] for key in choice.split("+")) for choice in choices}


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_check(trunk: nn.Module, digest_before: str, feature_sizes: Mapping[str, int]) -> dict:
    """The result's ``trunk`` entry: state sha256 before and now, whether they match, the feature sizes."""
    digest_after = state_digest(trunk)
    return {"sha256_before": digest_before, "sha256_after": digest_after, "unchanged": digest_before == digest_after,
            "feature_sizes": dict(feature_sizes)}


# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Features:
    """Trunk features of one dataset split: ``arrays[key]`` (N, C_key), labels (N,), class names, file names."""

    arrays: Mapping[str, np.ndarray]
    labels: np.ndarray
    classes: List[str]
    files: List[str] = field(default_factory=list)

    def choice(self, name: str, indices: Optional[np.ndarray] = None) -> np.ndarray:
        """(N, C) float32 features of choice ``name`` (keys joined by '+' are concatenated), rows ``indices``."""
        parts = [self.arrays[key] if indices is None else self.arrays[key][indices] for key in name.split("+")]
        return np.concatenate(parts, axis=1, dtype=np.float32) if len(parts) > 1 else np.array(parts[0], np.float32)


@torch.no_grad()
def extract(trunk: nn.Module, dataset: Dataset, keys: Sequence[str], batch_size: int = 256, num_workers: int = 0,
            allocate: Optional[Callable[[str, Tuple[int, int]], np.ndarray]] = None, progress: bool = False,
            description: str = "features") -> Dict[str, np.ndarray]:
    """Features ``{key: (N, C_key) float32}`` of every item of ``dataset`` (in order), one trunk pass per batch.

    ``allocate(key, shape)`` makes the array of a key on the first batch, once the feature sizes are known (e.g. a
    memmap); by default an in-memory array.
    """
    from tqdm import tqdm

    device = next(trunk.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    arrays: Dict[str, np.ndarray] = {}
    start = 0
    with eval_mode(trunk):
        for images, _ in tqdm(loader, desc=description, unit="batch", disable=not progress):
            outputs = trunk(images.to(device, non_blocking=True), out_feat_keys=list(keys))
            for key, output in zip(keys, outputs):
                if key not in arrays:
                    shape = (len(dataset), output.shape[-1])
                    arrays[key] = allocate(key, shape) if allocate else np.empty(shape, dtype=np.float32)
                arrays[key][start:start + len(images)] = output.float().cpu().numpy()
            start += len(images)
    return arrays


def extract_all(trunk: nn.Module, dataset: Dataset, keys: Sequence[str], **run) -> Dict[str, np.ndarray]:
    """``extract`` over every item of ``dataset`` by all ranks together: each extracts its shard, every rank
    returns all rows in dataset order (one process: ``extract``). ``run``: ``extract``'s options but ``allocate``."""
    if distributed.world_size() == 1:
        return extract(trunk, dataset, keys, **run)
    rows = distributed.shard_indices(len(dataset))
    local = extract(trunk, Subset(dataset, rows.tolist()), keys, **run)
    return {key: distributed.gather_rows(local[key], rows, len(dataset)) for key in keys}


def _samples_digest(samples: Sequence[Tuple[str, int]]) -> str:
    """sha256 of each sample's path, label, size, modification and change time (ns): a file replaced or rewritten,
    even with its old size and modification time put back, changes it."""
    digest = hashlib.sha256()
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ctime_ns}\n".encode())
    return digest.hexdigest()


# Temporary arrays: .<array>.<pid>@<host>.npy.tmp, renamed to <array>.npy when complete (<array>: <key> or
# <key>.shard-<r>-of-<W>).
_TMP = re.compile(r"\.(?P<array>\w+(?:\.shard-\d+-of-\d+)?)\.(?P<pid>\d+)@(?P<host>[\w-]+)\.npy\.tmp")
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


def _clean_orphans(entry: Path) -> None:
    """Delete the temporary arrays of writers on this host that no longer run (killed mid-extraction)."""
    for path in entry.iterdir():
        match = _TMP.fullmatch(path.name)
        if match and match["host"] == _HOST:
            try:
                os.kill(int(match["pid"]), 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
            except PermissionError:  # alive, another user's
                pass


def _array_names(key: str, shards: int) -> List[str]:
    """File stems of a key's arrays written by ``shards`` ranks."""
    return [key] if shards == 1 else [f"{key}.shard-{r}-of-{shards}" for r in range(shards)]


def _remove_arrays(entry: Path, key: str) -> None:
    """Delete every array of ``key`` in a cache entry, whatever world size wrote it (only names of our layout)."""
    for path in [entry / f"{key}.npy", *entry.glob(f"{key}.shard-*-of-*.npy")]:
        if re.fullmatch(rf"{re.escape(key)}(\.shard-\d+-of-\d+)?\.npy", path.name):
            path.unlink(missing_ok=True)


def _load_array(entry: Path, key: str, shards: int, num_samples: int) -> np.ndarray:
    """A key's (N, C) array: memory-mapped when one process wrote it, else its shards assembled in memory."""
    if shards == 1:
        return np.load(entry / f"{key}.npy", mmap_mode="r")
    parts = [np.load(entry / f"{name}.npy", mmap_mode="r") for name in _array_names(key, shards)]
    array = np.empty((num_samples, parts[0].shape[1]), dtype=np.float32)
    for r, part in enumerate(parts):
        array[distributed.shard_indices(num_samples, r, shards)] = part
    return array


def split_features(trunk: nn.Module, dataset: str, split: str, keys: Sequence[str], preprocess: Preprocess,
                   batch_size: int = 256, num_workers: int = 0, cache_dir: Optional[Path] = None,
                   trunk_digest: Optional[str] = None, model: Optional[Mapping] = None,
                   progress: bool = False) -> Features:
    """Features of catalog dataset ``dataset``, split ``split``, for trunk ``keys``; cached when ``cache_dir``.

    ``trunk_digest`` (default: ``state_digest(trunk)``) identifies the weights in the cache; ``model`` (e.g. the
    checkpoint path and sha256) is recorded in the cache's ``meta.json``. A cache entry is keyed on the weights,
    the split's folder and the image transform; its arrays are used only while ``meta.json``'s digest of the
    samples (paths, labels, file sizes and times) matches the split's files, else they are computed again.
    With several processes every rank calls this together; each extracts its shard, and all get every row.
    """
    transform = preprocess.eval_transform()
    folder = image_folder(dataset, split, transform)
    root = Path(folder.root)
    labels = np.asarray(folder.targets, dtype=np.int64)
    files = [os.path.relpath(path, root) for path, _ in folder.samples]
    run = dict(batch_size=batch_size, num_workers=num_workers, progress=progress and distributed.is_main(),
               description=f"{dataset}/{split}")
    if cache_dir is None:
        return Features(extract_all(trunk, folder, keys, **run), labels, folder.classes, files)
    description = {
        "trunk_sha256": trunk_digest or state_digest(trunk), "dataset": dataset, "split": split,
        "folder": str(root), "preprocess": dataclasses.asdict(preprocess), "transform": repr(transform),
        "torchvision": torchvision.__version__,
    }
    entry = Path(cache_dir) / hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]
    samples = {"samples_sha256": _samples_digest(folder.samples), "num_samples": len(labels)}
    meta_path = entry / "meta.json"
    if distributed.is_main():  # rank 0 decides what is missing and tidies; the others wait for its answer
        entry.mkdir(parents=True, exist_ok=True)
        _clean_orphans(entry)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        current = meta.get("samples_sha256") == samples["samples_sha256"]
        sizes = dict(meta.get("feature_sizes", {})) if current else {}
        shards = {key: int(meta.get("shards", {}).get(key, 1)) for key in sizes}
        for stale in set(meta.get("feature_sizes", {})) - set(sizes):  # arrays of files that have changed since
            _remove_arrays(entry, stale)
        missing = [key for key in keys if key not in sizes or not all(
            (entry / f"{name}.npy").is_file() for name in _array_names(key, shards[key]))]
        for key in missing:  # incomplete or stale: replaced by the arrays of this world size
            _remove_arrays(entry, key)
        plan = (meta, sizes, shards, missing)
    meta, sizes, shards, missing = distributed.broadcast(plan if distributed.is_main() else None)
    if missing:
        world, rank = distributed.world_size(), distributed.rank()
        rows = distributed.shard_indices(len(labels))
        names = {key: _array_names(key, world)[rank] for key in missing}
        tmp_paths = {key: entry / f".{names[key]}.{os.getpid()}@{_HOST}.npy.tmp" for key in missing}

        def allocate(key, shape):
            return np.lib.format.open_memmap(tmp_paths[key], mode="w+", dtype=np.float32, shape=shape)

        try:
            arrays = extract(trunk, Subset(folder, rows.tolist()), missing, allocate=allocate, **run)
            for key, array in arrays.items():
                array.flush()
                os.replace(tmp_paths[key], entry / f"{names[key]}.npy")
                sizes[key], shards[key] = int(array.shape[1]), world
        finally:
            for path in tmp_paths.values():
                path.unlink(missing_ok=True)
        distributed.barrier()  # every shard is in place
        if distributed.is_main():
            known = meta.get("model", {}) if sizes.keys() - set(missing) else {}  # the model of earlier keys
            atomic.write_json({**description, **samples, "model": dict(model or known), "feature_sizes": sizes,
                               "shards": shards}, meta_path)
        distributed.barrier()
    arrays = {key: _load_array(entry, key, shards[key], len(labels)) for key in keys}
    return Features(arrays, labels, folder.classes, files)
