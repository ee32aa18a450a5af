"""Linear probes: a grid of linear heads trained side by side on frozen features, the best chosen on held-out data.

Protocol (the choices below are the documented ones; the numbers come from a recipe, see ``load_recipe``):

* Grid: every (feature choice, learning rate, weight decay) gets its own linear head and its own optimizer state.
  All heads see the same batches in the same order, so the trunk runs once per batch for the whole grid.
* Selection: a stratified ``heldout_fraction`` of the training images (fixed seed, see ``subsets.heldout_split``)
  is kept out of training; the head with the best held-out top-1 is chosen (first in grid order on ties). The test
  split (the dataset's ``val``) never takes part: every head's test accuracy is reported next to its held-out one.
  With no held-out image (e.g. one labelled image per class) the choice falls back to training accuracy, and the
  result says so (``selected_on``).
* Optimiser: SGD with momentum 0.9 (``torch.optim.SGD`` semantics), weight decay on the weights only, the
  learning rate following a cosine from its grid value to 0 over all steps, no warm-up. Heads start at
  N(0, 0.01^2) weights and zero biases, all from the same draw.
* Features are standardised per dimension (zero mean, unit variance) with statistics of the training images:
  exact ones over all of them for cached features; for streamed ones, those of at most ``stats_samples`` random
  augmented training images, the distribution the heads train on (what BatchNorm's running statistics estimate in
  MAE's probe). Standardisation lets one learning-rate grid fit every feature choice.
* Cached mode (``stream: false``): features are extracted once without augmentation (and cached on disk when asked)
  and every epoch reuses them. Streamed mode (``stream: true``): each training batch is augmented (random resized
  crop over ``crop_scale`` of the area, flip if ``hflip``) and goes through the trunk, once for all heads; held-out
  and test features are extracted once, without augmentation.
* Several processes (``distributed``): every rank extracts its shard of the images, and the features are gathered
  (cached mode) or stay with the rank that read them (streamed mode, each rank's part of every global batch). All
  ranks take the same global batches in the same order; each computes its part's losses divided by the global batch
  size, the gradients are summed over the ranks, and every head keeps its own optimizer state, so the step is the
  one process's up to float rounding. Streamed training images are augmented from a seed of (seed, epoch, image),
  so the images do not depend on the world size, the loader workers or a resume.
* Checkpoints (streamed mode, with ``state_dir``): rank 0 saves every head and its momentum after each epoch
  (``.probe-state-<id>.torch``, atomically; the id hashes the recipe, data, seed and trunk weights); a rerun of the same probe resumes after the last saved epoch and ends
  where the uninterrupted run ends. The file is removed when the probe is done.

The trunk is in eval mode under ``torch.no_grad`` whenever it runs; the sha256 of its state before and after the
probe is part of the result (``trunk.unchanged``), the sanity check of MoCo v3's linear probe.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from convit_ssl import atomic
from convit_ssl.errors import UsageError
from convit_ssl.evaluation import distributed
from convit_ssl.evaluation.accuracy import score_hits
from convit_ssl.evaluation.features import (
    Features, Preprocess, check_feature_choices, data_statistics, extract_all, frozen_check, image_folder,
    split_features, state_digest, trunk_keys,
)
from convit_ssl.evaluation.subsets import class_subset, heldout_split
from convit_ssl.models.modes import eval_mode

MOMENTUM = 0.9
INIT_STD = 0.01
RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs" / "config" / "convit_ssl" / "benchmark" / "linear"


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Everything a probe needs besides the trunk; the YAML files in ``RECIPE_DIR`` document each field."""

    dataset: str
    image_size: int
    crop_ratio: float
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    epochs: int
    batch_size: int
    lrs: Tuple[float, ...]
    wds: Tuple[float, ...]
    features: Tuple[str, ...]
    heldout_fraction: float
    stream: bool
    crop_scale: Tuple[float, float]
    hflip: bool
    stats_samples: int

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, self.crop_ratio, self.mean, self.std)

    def replace(self, **changes) -> "Recipe":
        """A copy with the changes that are not None (command-line overrides)."""
        changes = {key: value for key, value in changes.items() if value is not None}
        return _coerce(dataclasses.replace(self, **changes), "overrides")


# What each number of a recipe must be, and good values (see ``check_number``); the command-line overrides have
# the same names.
_RANGES = {"image_size": (">= 1", "224"), "crop_ratio": ("(0, 1]", "0.875"), "std": ("> 0", "0.229 0.224 0.225"),
           "epochs": (">= 1", "100"), "batch_size": (">= 1", "256"), "lrs": ("> 0", "0.1 0.3 1"),
           "wds": (">= 0", "0 0.0001"), "heldout_fraction": ("[0, 1)", "0.1"), "stats_samples": (">= 1", "10000")}
_RULES = {">= 1": lambda x: x >= 1, ">= 0": lambda x: x >= 0, "> 0": lambda x: x > 0,
          "(0, 1]": lambda x: 0 < x <= 1, "[0, 1)": lambda x: 0 <= x < 1}


def check_number(value: float, rule: str, name: str, example: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is finite and keeps ``rule`` (a key of ``_RULES``)."""
    if not (math.isfinite(value) and _RULES[rule](value)):
        raise UsageError(f"{name} {value:g} must be {'in ' if rule[0] in '([' else ''}{rule} (e.g. {example})")


def recipe_names() -> List[str]:
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def _coerce(recipe: Recipe, source: str) -> Recipe:
    try:
        values = {
            "dataset": str(recipe.dataset), "image_size": int(recipe.image_size),
            "crop_ratio": float(recipe.crop_ratio), "mean": tuple(float(v) for v in recipe.mean),
            "std": tuple(float(v) for v in recipe.std), "epochs": int(recipe.epochs),
            "batch_size": int(recipe.batch_size), "lrs": tuple(float(v) for v in recipe.lrs),
            "wds": tuple(float(v) for v in recipe.wds), "features": tuple(str(v) for v in recipe.features),
            "heldout_fraction": float(recipe.heldout_fraction), "stream": bool(recipe.stream),
            "crop_scale": tuple(float(v) for v in recipe.crop_scale), "hflip": bool(recipe.hflip),
            "stats_samples": int(recipe.stats_samples),
        }
    except (TypeError, ValueError) as error:
        raise UsageError(f"recipe {source}: a field has the wrong type ({error}); lrs, wds and features are lists")
    for field_name in ("lrs", "wds", "features"):
        if not values[field_name]:
            raise UsageError(f"recipe {source}: {field_name} is empty; give at least one value")
    for field_name, (rule, example) in _RANGES.items():
        for value in values[field_name] if isinstance(values[field_name], tuple) else (values[field_name],):
            check_number(value, rule, f"--{field_name.replace('_', '-')}" if source == "overrides"
                         else f"recipe {source}: {field_name}", example)
    if len(values["mean"]) != 3 or len(values["std"]) != 3:
        raise UsageError(f"recipe {source}: mean and std need one value per RGB channel")
    if len(values["crop_scale"]) != 2 or not 0 < values["crop_scale"][0] <= values["crop_scale"][1] <= 1:
        raise UsageError(f"recipe {source}: crop_scale is [smallest, largest] share of the image area, in (0, 1]")
    return Recipe(**values)


def _recipe_path(name: str, folder: Path = Path(".")) -> Path:
    """A shipped recipe's file, or the YAML file ``name`` (relative to ``folder``)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPE_DIR / f"{name}.yaml"
    elif not path.is_absolute():
        path = folder / path
    if not path.is_file():
        raise UsageError(f"unknown recipe {name!r}; known: {', '.join(recipe_names())} (or pass a .yaml path)")
    return path


def _recipe_fields(path: Path, including: Tuple[Path, ...] = ()) -> dict:
    """The fields of the recipe file ``path``: those of the recipes its ``defaults`` list names, in order, then
    its own (where ``_self_`` stands, last if absent); ``normalisation: DATA`` gives the mean and std of a data file."""
    import yaml

    if path in including:
        raise UsageError(f"recipe {path.name}: its defaults include it again ({' -> '.join(p.name for p in including)})")
    own = yaml.safe_load(path.read_text()) or {}
    defaults = list(own.pop("defaults", None) or [])
    if "normalisation" in own:
        own = {**data_statistics(own.pop("normalisation")), **own}
    fields: dict = {}
    for entry in defaults if "_self_" in defaults else [*defaults, "_self_"]:
        fields.update(own if entry == "_self_" else _recipe_fields(_recipe_path(entry, path.parent),
                                                                     (*including, path)))
    return fields


def load_recipe(name: str) -> Recipe:
    """Recipe ``name`` from ``RECIPE_DIR`` (or a path to a YAML file), its ``defaults`` resolved (see
    ``_recipe_fields``); every field must be given, no other."""
    path = _recipe_path(name)
    data = _recipe_fields(path)
    fields = [field.name for field in dataclasses.fields(Recipe)]
    unknown, missing = sorted(set(data) - set(fields)), [key for key in fields if key not in data]
    if unknown or missing:
        raise UsageError(f"recipe {path.name}: " + "; ".join(
            part for part in (f"unknown field(s) {', '.join(unknown)}" if unknown else "",
                              f"missing field(s) {', '.join(missing)}" if missing else "") if part)
            + f"; the fields are {', '.join(fields)}")
    return _coerce(Recipe(**data), path.name)


# ---------------------------------------------------------------------------------------------------------------
# A grid of heads on one feature choice
# ---------------------------------------------------------------------------------------------------------------
class HeadGrid(nn.Module):
    """G linear heads on one feature choice, stacked: weight (G, K, D), bias (G, K); head g has lrs[g], wds[g].

    Inputs are standardised with ``mean`` and ``std`` (D,). ``sgd_step`` is ``torch.optim.SGD(momentum=0.9)``
    run per head, with weight decay on the weight only.
    """

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], wds: Sequence[float],
                 mean: torch.Tensor, std: torch.Tensor, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(num_classes, dim, generator=generator) * INIT_STD
        self.weight = nn.Parameter(weight.expand(len(lrs), -1, -1).clone())
        self.bias = nn.Parameter(torch.zeros(len(lrs), num_classes))
        self.register_buffer("lrs", torch.tensor(lrs, dtype=torch.float32))
        self.register_buffer("wds", torch.tensor(wds, dtype=torch.float32))
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.register_buffer("weight_momentum", torch.zeros_like(self.weight))
        self.register_buffer("bias_momentum", torch.zeros_like(self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every head, (G, B, K), for raw features x (B, D)."""
        z = (x - self.mean) / self.std
        return torch.einsum("bd,gkd->gbk", z, self.weight) + self.bias[:, None, :]

    def losses(self, x: torch.Tensor, labels: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """Cross-entropy of each head summed over the rows and divided by ``batch_size`` (default: the rows, so the
        mean; with several ranks the global batch, so the ranks' losses add up to its mean), (G,)."""
        logits = self(x)
        G, B, K = logits.shape
        losses = F.cross_entropy(logits.reshape(G * B, K), labels.repeat(G), reduction="none").view(G, B)
        return losses.sum(dim=1) / (B if batch_size is None else batch_size)

    @torch.no_grad()
    def sgd_step(self, lr_scale: float) -> None:
        """One SGD-with-momentum step of every head from the current gradients, then zero them."""
        lr = (self.lrs * lr_scale).view(-1, 1, 1)
        self.weight_momentum.mul_(MOMENTUM).add_(self.weight.grad + self.wds.view(-1, 1, 1) * self.weight)
        self.bias_momentum.mul_(MOMENTUM).add_(self.bias.grad)
        self.weight.sub_(lr * self.weight_momentum)
        self.bias.sub_(lr[:, :, 0] * self.bias_momentum)
        self.weight.grad = None
        self.bias.grad = None

    @torch.no_grad()
    def accuracy(self, x: np.ndarray, labels: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """(G, 2) top-1 and top-5 accuracy in percent of every head (top-5 is top-K with K < 5 classes)."""
        hits = torch.zeros(self.weight.shape[0], 2, dtype=torch.float64)
        device = self.weight.device
        for start in range(0, len(labels), chunk):
            logits = self(torch.as_tensor(x[start:start + chunk], device=device))
            targets = torch.as_tensor(labels[start:start + chunk], device=device)
            hits += score_hits(logits, targets).cpu()
        return (100.0 * hits / max(1, len(labels))).numpy()


def standardisation(features: np.ndarray, chunk: int = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of (N, D) features (float64 sums; constant dimensions get std 1)."""
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    for start in range(0, len(features), chunk):
        block = np.asarray(features[start:start + chunk], dtype=np.float64)
        total += block.sum(axis=0)
        squares += (block * block).sum(axis=0)
    mean = total / len(features)
    std = np.sqrt(np.maximum(squares / len(features) - mean * mean, 0.0))
    std[std < 1e-6] = 1.0
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


# (features by choice, labels), or with several ranks (features, labels, global batch size) of this rank's part
Batches = Callable[[int], Iterable[Tuple]]


def train_heads(grids: Mapping[str, HeadGrid], batches: Batches, epochs: int, steps_per_epoch: int,
                start_epoch: int = 0, last_losses: Optional[Mapping[str, np.ndarray]] = None,
                after_epoch: Optional[Callable[[int, Dict[str, np.ndarray]], None]] = None) -> Dict[str, np.ndarray]:
    """Train every grid on ``batches(epoch)`` ((features by choice, labels) pairs); cosine learning rate per step.

    With several ranks each yields its part of every global batch as a triple (features, labels, global batch
    size), the same number of steps on every rank (parts may be empty): the losses of each part are divided by the
    global batch size and the gradients and losses summed over the ranks (one all-reduce a step), so the step is
    the one of the whole batch. ``start_epoch`` continues a resumed run (whose
    ``last_losses`` stand until an epoch ends); ``after_epoch(epochs_done, last_losses)`` runs after each epoch.
    Returns each grid's mean training loss per head over the last epoch.
    """
    total_steps = epochs * steps_per_epoch
    step = start_epoch * steps_per_epoch
    summary = dict(last_losses or {})
    for epoch in range(start_epoch, epochs):
        epoch_losses: Dict[str, List[torch.Tensor]] = {choice: [] for choice in grids}
        for features, labels, *whole in batches(epoch):
            lr_scale = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            batch_size = whole[0] if whole else len(labels)
            losses = {}
            for choice, grid in grids.items():
                losses[choice] = grid.losses(features[choice], labels, batch_size)
                losses[choice].sum().backward()
                losses[choice] = losses[choice].detach()
            distributed.all_reduce_sum_([tensor for choice, grid in grids.items()
                                         for tensor in (grid.weight.grad, grid.bias.grad, losses[choice])])
            for choice, grid in grids.items():
                grid.sgd_step(lr_scale)
                epoch_losses[choice].append(losses[choice])
            step += 1
        summary = {choice: torch.stack(values).mean(dim=0).cpu().numpy() for choice, values in epoch_losses.items()}
        if after_epoch is not None:
            after_epoch(epoch + 1, summary)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------------
def _grid_points(recipe: Recipe) -> List[Tuple[float, float]]:
    return list(itertools.product(recipe.lrs, recipe.wds))


def _make_grids(recipe: Recipe, dims: Mapping[str, int], num_classes: int,
                stats: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], seed: int, device) -> Dict[str, HeadGrid]:
    lrs, wds = zip(*_grid_points(recipe))
    return {choice: HeadGrid(dims[choice], num_classes, lrs, wds, *stats[choice], seed=seed).to(device)
            for choice in recipe.features}


def _assemble(recipe: Recipe, grids: Mapping[str, HeadGrid], losses: Mapping[str, np.ndarray],
              accuracies: Mapping[str, Mapping[str, np.ndarray]], counts: Mapping[str, int], dataset: str,
              fraction: float, subset_rule: str, seed: int, name: str) -> dict:
    """The result body: the whole grid with its numbers, the chosen head, one summary row."""
    grid = []
    for choice in recipe.features:
        for g, (lr, wd) in enumerate(_grid_points(recipe)):
            entry = {"feature": choice, "lr": lr, "wd": wd, "final_train_loss": float(losses[choice][g])}
            for split, by_choice in accuracies.items():
                entry[f"{split}_top1"], entry[f"{split}_top5"] = (float(v) for v in by_choice[choice][g])
            grid.append(entry)
    if len(grid) == 1:
        selected_on = "single head"
    elif counts["heldout"] > 0:
        selected_on = "heldout"
    else:
        selected_on = "train (no held-out images)"
    criterion = "train_top1" if selected_on.startswith("train") else "heldout_top1"
    best = int(np.argmax([entry.get(criterion, 0.0) for entry in grid]))
    chosen = {"index": best, "selected_on": selected_on, **grid[best]}
    row = {"kind": "linear_probe", "model": name, "dataset": dataset, "fraction": fraction,
           "feature": chosen["feature"], "lr": chosen["lr"], "wd": chosen["wd"], "selected_on": selected_on,
           "top1": chosen["test_top1"], "top5": chosen["test_top5"]}
    return {
        "kind": "linear_probe",
        "dataset": {"name": dataset, "fraction": fraction, "subset_rule": subset_rule, **counts},
        "recipe": dataclasses.asdict(recipe), "seed": seed, "grid": grid, "chosen": chosen, "rows": [row],
    }


def probe_features(train: Features, test: Features, recipe: Recipe, fraction: float = 1.0,
                   subset_rule: str = "random", seed: int = 0, dataset: Optional[str] = None, name: str = "",
                   device: str | torch.device = "cpu") -> dict:
    """Train and evaluate the recipe's grid on extracted features (cached mode); returns the result body.

    ``fraction`` < 1 keeps that fraction of the training labels per class (``subsets.class_subset``, drawn with
    ``seed`` by ``subset_rule``) before the held-out split.
    """
    pool = class_subset(train.labels, fraction, seed, subset_rule, train.files)
    fit, heldout = heldout_split(train.labels, recipe.heldout_fraction, seed, indices=pool)
    fit_x = {choice: torch.from_numpy(train.choice(choice, fit)).to(device) for choice in recipe.features}
    fit_y = torch.from_numpy(train.labels[fit]).to(device)
    stats = {choice: standardisation(x.cpu().numpy()) for choice, x in fit_x.items()}
    dims = {choice: x.shape[1] for choice, x in fit_x.items()}
    grids = _make_grids(recipe, dims, len(train.classes), stats, seed, device)
    order = torch.Generator().manual_seed(seed)

    def batches(epoch: int):
        permutation = torch.randperm(len(fit), generator=order).to(device)
        for start in range(0, len(fit), recipe.batch_size):
            index = permutation[start:start + recipe.batch_size]
            part = index[torch.from_numpy(distributed.shard_indices(len(index))).to(device)]  # this rank's part
            yield {choice: x[part] for choice, x in fit_x.items()}, fit_y[part], len(index)

    losses = train_heads(grids, batches, recipe.epochs, math.ceil(len(fit) / recipe.batch_size))
    splits = {"train": (train, fit), "heldout": (train, heldout), "test": (test, None)}
    accuracies = {
        split: {choice: grids[choice].accuracy(features.choice(choice, index), features.labels if index is None
                                               else features.labels[index]) for choice in recipe.features}
        for split, (features, index) in splits.items() if index is None or len(index)
    }
    counts = {"train": len(fit), "heldout": len(heldout), "test": len(test.labels), "classes": len(train.classes)}
    return _assemble(recipe, grids, losses, accuracies, counts, dataset or recipe.dataset, fraction, subset_rule,
                     seed, name)


class SeededAugmentation(Dataset):
    """``dataset`` items by key ``(draw, index)``, each augmented from a seed of (``seed``, ``draw``, ``index``): the
    same image whichever process, loader worker or resumed run reads it (the torch generator around is left as it
    was). ``draw`` is 0 for the standardisation sample and 1 + the epoch for training."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        draw, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, draw, index]).generate_state(1)[0]))
            return self.dataset[index]


def _collate_part(items):
    """A rank's part of a global batch; None when the batch had too few images to give this rank any."""
    return default_collate(items) if items else None


def _streamed_state(path: Optional[Path], grids: Mapping[str, HeadGrid]):
    """(epochs done, last-epoch losses) of the checkpoint at ``path`` (named by the probe it belongs to), its heads
    loaded into ``grids``; (0, None) without one."""
    if path is None or not path.is_file():
        return 0, None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for choice, grid in grids.items():
        grid.load_state_dict(state["grids"][choice])
    return int(state["epochs_done"]), {choice: np.asarray(v) for choice, v in state["last_losses"].items()}


def _probe_streamed(trunk: nn.Module, recipe: Recipe, dataset: str, fraction: float, subset_rule: str, seed: int,
                    num_workers: int, cache_dir: Optional[Path], trunk_digest: str, model: Mapping, name: str,
                    progress: bool, state_dir: Optional[Path]) -> dict:
    keys = trunk_keys(recipe.features)
    plain = image_folder(dataset, "train", recipe.preprocess.eval_transform())
    augmented = SeededAugmentation(
        image_folder(dataset, "train", recipe.preprocess.train_transform(recipe.crop_scale, recipe.hflip)), seed)
    labels = np.asarray(plain.targets, dtype=np.int64)
    pool = class_subset(labels, fraction, seed, subset_rule, [path for path, _ in plain.samples])
    fit, heldout = heldout_split(labels, recipe.heldout_fraction, seed, indices=pool)
    if len(heldout) == 0:
        raise UsageError("a streamed probe chooses its head on held-out images, and there are none: raise "
                         "heldout_fraction (e.g. --heldout-fraction 0.1) or probe cached features (stream: false)")
    progress = progress and distributed.is_main()
    run = dict(batch_size=recipe.batch_size, num_workers=num_workers, progress=progress)
    sample = np.sort(np.random.default_rng(seed).permutation(fit)[:recipe.stats_samples])
    at_rest = {
        "stats": Features(extract_all(trunk, Subset(augmented, [(0, i) for i in sample.tolist()]), keys,
                                      description="statistics", **run), labels[sample], plain.classes),
        "heldout": Features(extract_all(trunk, Subset(plain, heldout.tolist()), keys, description="held-out", **run),
                            labels[heldout], plain.classes),
        "test": split_features(trunk, dataset, "val", keys, recipe.preprocess, cache_dir=cache_dir,
                               trunk_digest=trunk_digest, model=model, **run),
    }
    device = next(trunk.parameters()).device
    stats = {choice: standardisation(at_rest["stats"].choice(choice)) for choice in recipe.features}
    dims = {choice: len(mean) for choice, (mean, _) in stats.items()}
    grids = _make_grids(recipe, dims, len(plain.classes), stats, seed, device)
    identity = hashlib.sha256(json.dumps([dataclasses.asdict(recipe), dataset, fraction, subset_rule, seed,
                                          trunk_digest], sort_keys=True).encode()).hexdigest()[:24]
    state_path = Path(state_dir) / f".probe-state-{identity}.torch" if state_dir is not None else None
    epochs_done, last_losses = _streamed_state(state_path, grids)
    steps = math.ceil(len(fit) / recipe.batch_size)

    def global_batches(epoch: int) -> List[List[Tuple[int, int]]]:
        """This rank's part of every global batch of ``epoch``: the same permutation on every rank."""
        order = fit[np.random.default_rng([seed, epoch]).permutation(len(fit))]
        parts = []
        for start in range(0, len(fit), recipe.batch_size):
            batch = order[start:start + recipe.batch_size]
            parts.append([(1 + epoch, int(i)) for i in batch[distributed.shard_indices(len(batch))]])
        return parts

    sizes = [min(recipe.batch_size, len(fit) - start) for start in range(0, len(fit), recipe.batch_size)]

    def batches(epoch: int):
        loader = DataLoader(augmented, batch_sampler=global_batches(epoch), collate_fn=_collate_part,
                            num_workers=num_workers, pin_memory=device.type == "cuda")
        for part, batch_size in zip(loader, sizes):
            if part is None:
                yield ({choice: torch.zeros(0, dim, device=device) for choice, dim in dims.items()},
                       torch.zeros(0, dtype=torch.int64, device=device), batch_size)
                continue
            images, targets = part
            with torch.no_grad():
                outputs = dict(zip(keys, trunk(images.to(device, non_blocking=True), out_feat_keys=keys)))
            yield ({choice: torch.cat([outputs[key] for key in choice.split("+")], dim=1).float()
                    for choice in recipe.features}, targets.to(device), batch_size)

    def save_state(done: int, losses: Dict[str, np.ndarray]) -> None:
        if state_path is not None and distributed.is_main():
            atomic.torch_save({"identity": identity, "epochs_done": done,
                               "grids": {choice: grid.state_dict() for choice, grid in grids.items()},
                               "last_losses": {choice: torch.from_numpy(v) for choice, v in losses.items()}},
                              state_path)

    with eval_mode(trunk):
        losses = train_heads(grids, batches, recipe.epochs, steps, epochs_done, last_losses, save_state)
    accuracies = {split: {choice: grids[choice].accuracy(at_rest[split].choice(choice), at_rest[split].labels)
                          for choice in recipe.features} for split in ("heldout", "test")}
    counts = {"train": len(fit), "heldout": len(heldout), "test": len(at_rest["test"].labels),
              "classes": len(plain.classes)}
    body = _assemble(recipe, grids, losses, accuracies, counts, dataset, fraction, subset_rule, seed, name)
    body["resumed_at_epoch"] = epochs_done
    if state_path is not None and distributed.is_main():  # done: a rerun is a new probe
        state_path.unlink(missing_ok=True)
    return body


def linear_probe(trunk: nn.Module, recipe: Recipe, dataset: Optional[str] = None, fraction: float = 1.0,
                 subset_rule: str = "random", seed: int = 0, num_workers: int = 0, cache_dir: Optional[Path] = None,
                 model: Optional[Mapping] = None, progress: bool = False, state_dir: Optional[Path] = None) -> dict:
    """Probe ``trunk`` with ``recipe`` on catalog dataset ``dataset`` (default: the recipe's); returns the result body.

    ``model`` describes the trunk for the cache and the result (its ``name`` labels the summary row). The body has
    ``grid`` (every head: feature, lr, wd, held-out / test / train accuracy, last-epoch loss), ``chosen``, ``rows``
    and ``trunk`` (state sha256 before and after, ``unchanged``, feature sizes). A streamed probe with ``state_dir``
    checkpoints its heads there after every epoch and resumes from that checkpoint when started again.
    With several processes every rank calls this together (see the module docstring).
    """
    started = time.time()
    dataset = dataset or recipe.dataset
    model = dict(model or {})
    digest_before = state_digest(trunk)
    sizes = check_feature_choices(trunk, recipe.features, recipe.image_size)
    common = dict(fraction=fraction, subset_rule=subset_rule, seed=seed, name=model.get("name", ""))
    if recipe.stream:
        body = _probe_streamed(trunk, recipe, dataset, num_workers=num_workers, cache_dir=cache_dir,
                               trunk_digest=digest_before, model=model, progress=progress, state_dir=state_dir,
                               **common)
    else:
        keys = trunk_keys(recipe.features)
        extract_args = dict(batch_size=recipe.batch_size, num_workers=num_workers, cache_dir=cache_dir,
                            trunk_digest=digest_before, model=model, progress=progress)
        train = split_features(trunk, dataset, "train", keys, recipe.preprocess, **extract_args)
        test = split_features(trunk, dataset, "val", keys, recipe.preprocess, **extract_args)
        body = probe_features(train, test, recipe, dataset=dataset, device=next(trunk.parameters()).device, **common)
    body["trunk"] = frozen_check(trunk, digest_before, sizes)
    body["probe_time_s"] = round(time.time() - started, 3)
    return body
