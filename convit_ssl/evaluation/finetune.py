"""Fine-tuning (the whole trunk plus a new head) through VISSL's train engine, on all labels or a subset of them.

``finetune(...)`` is what ``convit-ssl finetune`` runs:

1. **Labels** (``choose_labels``): the training images kept (``--labels``): all, a per-class fraction (``10%``,
   nested per seed as in ``subsets.class_subset``), ``N-per-class`` (the first N of the same per-class order, so
   nested too), or a file list in the 1% / 10% ImageNet format (one image file name per line, matched against the
   training split's file names; ``class/name`` where class folders reuse names). A held-out part of them
   (``heldout_fraction`` of each class, default ``HELDOUT_FRACTION``; never the test split) scores every epoch for
   choosing the best one.
2. **Start**: ``random`` (the recipe's model, randomly initialised) or a checkpoint read by
   ``convit_ssl.checkpoint.load_trunk`` (a run folder, VISSL, timm, official, DINO); a VISSL run's trunk shape
   comes from its config. The trunk is written as VISSL weights (``MODEL.WEIGHTS_INIT``) into the run folder's ``finetune_inputs/``.
3. **Run**: the recipe (``configs/config/convit_ssl/benchmark/finetune/NAME.yaml``) composed with the file lists and
   the command's ``KEY=VALUE`` words by ``engine.compose``, trained by ``engine.train``, as ``convit-ssl train``
   does: a rerun resumes its run folder, and the launcher runs it on SLURM.
4. **Result**: from the run's ``finetune_eval.jsonl`` (``convit_ssl.finetune_hook``), the test accuracy of the
   final epoch and of the epoch best on the held-out images, with a manifest that records the label subset
   (``convit-ssl results`` merges it with probe results).

Everything that can be wrong with the input (checkpoint, labels, head width) fails in one line before training.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from convit_ssl import atomic
from convit_ssl.errors import UsageError
from convit_ssl.evaluation.results import file_sha256, make_manifest, slug, write_new_result
from convit_ssl.evaluation.subsets import class_subset, heldout_split

RECIPE_GROUP = "convit_ssl/benchmark/finetune"
RECIPE_FOLDER = Path(__file__).resolve().parents[1] / "configs" / "config" / RECIPE_GROUP
HELDOUT_FRACTION = 0.1
# Trunk fields a fine-tuning recipe sets itself (regularisers), not copied from the pretraining run.
RECIPE_FIELDS = ("drop_path_rate", "drop_rate", "attn_drop_rate", "grad_checkpointing")
# The run folder's subfolder of what a fine-tuning reads: file lists and the initial trunk (a .torch file beside
# the checkpoints would be taken for one).
INPUTS_FOLDER = "finetune_inputs"


def scaled_epochs(base_epochs: int, fraction: float) -> int:
    """Epochs for a fraction f of the labels: base / f, so every fraction sees as many images as the full set (the
    paper's low-data protocol)."""
    return max(1, round(base_epochs / fraction))


def recipe_names() -> List[str]:
    return sorted(path.stem for path in RECIPE_FOLDER.glob("*.yaml") if path.stem != "base")


def recipe_config(name: str) -> str:
    if name not in recipe_names():
        raise UsageError(f"unknown fine-tuning recipe {name!r}: choose from {', '.join(recipe_names())} "
                         f"(configs/config/{RECIPE_GROUP})")
    return f"{RECIPE_GROUP}/{name}"


# ---------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LabelSubset:
    """The training images a fine-tuning learns from (``train``) and chooses its epoch on (``heldout``): indices
    into the training split's samples, sorted."""

    spec: str
    train: np.ndarray
    heldout: np.ndarray

    def describe(self, labels: np.ndarray, classes: Sequence[str]) -> dict:
        kept = np.concatenate([self.train, self.heldout])
        counts = np.bincount(labels[kept], minlength=len(classes))
        return {"labels": self.spec, "train_images": len(self.train), "heldout_images": len(self.heldout),
                "images_per_class": {name: int(count) for name, count in zip(classes, counts)}}


def parse_labels(spec: Optional[str]) -> Tuple[str, object]:
    """``None`` or ``100%`` -> ("fraction", 1.0); ``10%`` -> ("fraction", 0.1); ``13-per-class`` -> ("per_class",
    13); anything else is a file list path -> ("file", Path)."""
    if spec is None:
        return "fraction", 1.0
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)%", spec):
        fraction = float(match.group(1)) / 100
        if not 0 < fraction <= 1:
            raise UsageError(f"--labels {spec}: give a percentage in (0, 100], e.g. 10%")
        return "fraction", fraction
    if match := re.fullmatch(r"(\d+)-per-class", spec):
        count = int(match.group(1))
        if count < 1:
            raise UsageError(f"--labels {spec}: keep at least 1 image per class, e.g. 10-per-class")
        return "per_class", count
    if not Path(spec).is_file():
        raise UsageError(f"--labels {spec!r} is neither a percentage (10%), N-per-class (10-per-class) nor a file: "
                         f"give a file list with one image file name per line")
    return "file", Path(spec)


def _per_class(labels: np.ndarray, count: int, seed: int, classes: Sequence[str]) -> np.ndarray:
    """The first ``count`` images of each class in ``class_subset``'s per-class order (nested across counts)."""
    chosen = []
    for label in range(len(classes)):
        members = np.flatnonzero(labels == label)
        if len(members) < count:
            raise UsageError(f"--labels {count}-per-class: class {classes[label]!r} has only {len(members)} training "
                             f"images; ask for at most {len(members)} per class, or a percentage")
        chosen.append(np.random.default_rng([seed, label]).permutation(members)[:count])
    return np.sort(np.concatenate(chosen))


def _from_file_list(path: Path, files: Sequence[str]) -> np.ndarray:
    """Indices of the training images that ``path`` names (one per line: a file name, as the ImageNet 1% / 10%
    lists, or the end of a path, ``class/name``, matched against the end of each training image's path; a line
    that fits several images is an error)."""
    by_name: Dict[str, List[int]] = {}
    for index, file in enumerate(files):
        by_name.setdefault(Path(file).name, []).append(index)
    wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wanted:
        raise UsageError(f"file list {path} names no image: write one image file name per line")
    chosen, missing = [], []
    for name in wanted:
        parts = Path(name).parts
        matches = [index for index in by_name.get(parts[-1], []) if Path(files[index]).parts[-len(parts):] == parts]
        if len(matches) > 1:
            raise UsageError(f"file list {path}: the name {name} is that of {len(matches)} training images (in "
                             f"different folders); write each image as its path inside the split, e.g. class/{name}")
        chosen += matches
        missing += [] if matches else [name]
    if missing:
        raise UsageError(f"file list {path} names {len(missing)} of its {len(wanted)} images that the training split "
                         f"does not hold (first: {missing[0]}); check that the list belongs to this dataset")
    return np.unique(chosen)


def choose_labels(spec: Optional[str], labels: Sequence[int], files: Sequence[str], classes: Sequence[str],
                  seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION) -> LabelSubset:
    """The label subset ``spec`` (see ``parse_labels``) of a training split with ``labels`` and ``files`` (one per
    sample), split into training and held-out images; every class must keep at least one image."""
    labels = np.asarray(labels)
    kind, value = parse_labels(spec)
    if kind == "fraction":
        kept = class_subset(labels, value, seed)
    elif kind == "per_class":
        kept = _per_class(labels, value, seed, classes)
    else:
        kept = _from_file_list(value, files)
    empty = [classes[label] for label in range(len(classes)) if not np.any(labels[kept] == label)]
    if empty:
        raise UsageError(f"--labels {spec}: {len(empty)} of {len(classes)} classes keep no image (first: {empty[0]}); "
                         f"the head would never see them: keep more labels")
    train, heldout = heldout_split(labels, heldout_fraction, seed, indices=kept)
    return LabelSubset(spec or "100%", train, heldout)


def write_file_list(folder: Path, role: str, files: Sequence[str], labels: Sequence[int]) -> Tuple[Path, Path]:
    """VISSL's ``disk_filelist`` pair (image paths, labels) as ``.npy`` files named by their content, so a file
    that exists already holds exactly this list and is never overwritten with another."""
    images = np.asarray([str(file) for file in files])
    targets = np.asarray(labels, dtype=np.int64)
    digest = hashlib.sha256("\n".join(f"{file}\t{label}" for file, label in zip(images, targets)).encode())
    paths = []
    for suffix, array in (("images", images), ("labels", targets)):
        path = folder / f"{role}-{digest.hexdigest()[:12]}-{suffix}.npy"
        if not path.is_file():
            with atomic.open_atomic(path, "wb") as stream:
                np.save(stream, array, allow_pickle=False)
        paths.append(path)
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------------------------------------
# Start: random or a checkpoint
# ---------------------------------------------------------------------------------------------------------------
def _value(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def trunk_shape(trunk) -> Dict[str, object]:
    """The keyword arguments that fix the tensor shapes of a built ``ConViT`` (its initialisation options aside)."""
    blocks = trunk.blocks
    attention = blocks[0].attn
    bias = (attention.qk if hasattr(attention, "qk") else attention.qkv).bias is not None
    return {"img_size": [side * trunk.patch_size for side in trunk.grid_size], "patch_size": trunk.patch_size,
            "embed_dim": trunk.embed_dim, "depth": trunk.depth, "num_heads": trunk.num_heads,
            "local_up_to_layer": trunk.local_up_to_layer, "qkv_bias": bias,
            "mlp_ratio": blocks[0].mlp.fc1.out_features / trunk.embed_dim,
            "pos_embed_class_token": trunk.pos_embed_class_token}


def checkpoint_words(path: Path, trunk) -> List[str]:
    """``trunk.FIELD=VALUE`` words that give the fine-tuned trunk the shape of the checkpoint's: a VISSL run's
    trunk as its config describes it, any other the shape of ``trunk`` (the trunk read from it); the recipe's
    regularisers (``RECIPE_FIELDS``) are kept."""
    from convit_ssl.checkpoint import run_trunk_kwargs

    kwargs = run_trunk_kwargs(path) or trunk_shape(trunk)
    return [f"trunk.{key}={_value(value)}" for key, value in sorted(kwargs.items()) if key not in RECIPE_FIELDS]


def write_initial_trunk(state: Mapping, folder: Path) -> Path:
    """The trunk's state dict as VISSL weights (``classy_state_dict`` layout, no heads), named by its content."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    path = folder / f"initial_trunk-{hashlib.sha256(buffer.getvalue()).hexdigest()[:12]}.torch"
    if not path.is_file():
        atomic.torch_save({"classy_state_dict": {"base_model": {"model": {"trunk": dict(state), "heads": {}}}}},
                          path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Checks on the composed config
# ---------------------------------------------------------------------------------------------------------------
def head_classes(config) -> int:
    """The output width of the last head of ``config`` (its ``dims[-1]``)."""
    return int(config.MODEL.HEAD.PARAMS[-1][1]["dims"][-1])


def check_head(config, classes: Sequence[str], dataset: str) -> None:
    width = head_classes(config)
    if width != len(classes):
        raise UsageError(f"the head predicts {width} classes but {dataset} has {len(classes)}: set "
                         f"config.CONVIT_SSL.NUM_CLASSES={len(classes)} (or pick the data file of this dataset)")


def check_initial_trunk(config, trunk) -> None:
    """The checkpoint's trunk fits the trunk the config builds (same keys and shapes), in one line if not."""
    from convit_ssl.checkpoint import load_trunk_state
    from convit_ssl.models.convit import ConViT
    from convit_ssl.trunk_config import trunk_kwargs

    load_trunk_state(ConViT(**trunk_kwargs(config.MODEL)), trunk.state_dict(), source="the given")


# ---------------------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------------------
def read_evaluations(run_dir: Path) -> List[dict]:
    """One record per epoch from ``finetune_eval.jsonl`` (a repeated epoch: its last record), by epoch."""
    from convit_ssl.finetune_hook import EVAL_FILE

    path = Path(run_dir) / EVAL_FILE
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


def summarise(records: Sequence[Mapping]) -> Dict[str, Optional[dict]]:
    """``{"final": last epoch, "heldout": the epoch of the best held-out top-1 (the first of equals), or None
    without held-out images}``."""
    if not records:
        raise UsageError("the fine-tuning wrote no evaluation (finetune_eval.jsonl is empty): it trained no epoch")
    best = None
    if records[-1].get("heldout_images"):
        best = max(records, key=lambda record: (record["heldout_top1"], -record["epoch"]))
    return {"final": dict(records[-1]), "heldout": dict(best) if best is not None else None}


def result_rows(name: str, dataset: str, labels: str, chosen: Mapping[str, Optional[Mapping]]) -> List[dict]:
    rows = []
    for selected_on, record in chosen.items():
        if record is not None:
            rows.append({"kind": "finetune", "model": name, "dataset": dataset, "labels": labels,
                         "selected_on": selected_on, "epoch": record["epoch"], "top1": record["test_top1"],
                         "top5": record["test_top5"]})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The whole command
# ---------------------------------------------------------------------------------------------------------------
def _heldout_part(heldout_fraction: float) -> List[str]:
    """What a held-out fraction adds to the default run folder's hash: nothing for the default (so the folders of
    runs made before the option existed still resume)."""
    return [] if heldout_fraction == HELDOUT_FRACTION else [f"heldout_fraction={heldout_fraction!r}"]


def default_run_dir(recipe: str, source: str, labels: str, digest_parts: Sequence[str]) -> Path:
    """``runs/finetune-<recipe>-<source>-<labels>-<hash>``: the same command, the same folder (a rerun resumes)."""
    digest = hashlib.sha1("\n".join(digest_parts).encode()).hexdigest()[:8]
    root = Path(os.environ.get("CONVIT_SSL_RUNS", "runs"))
    return root / "-".join(["finetune", recipe, slug(source), slug(labels), digest])


@dataclass
class Prepared:
    """A fine-tuning ready to train: the words that ``engine.compose`` turns into its config (recipe, the command's
    words, file lists, initial weights, run folder), and what its result records."""

    words: List[str]
    run_dir: Path
    recipe: str
    dataset: str
    model_info: dict
    label_subset: dict
    seed: int
    checkpoint: str


def prepare(checkpoint: str, recipe: str, labels: Optional[str] = None, words: Sequence[str] = (), seed: int = 0,
            arch: Optional[str] = None, fit_batch: bool = False, trunk_options: Optional[Mapping] = None,
            heldout_fraction: float = HELDOUT_FRACTION) -> Prepared:
    """Check everything, choose the labels and write the run folder's ``finetune_inputs/`` (file lists, initial
    trunk; named by their content, so every node of a job can prepare the same run). ``fit_batch``: a batch larger
    than the training images shrinks to them (the low-data study's smallest subsets), with a note.
    ``trunk_options``: the checkpoint's trunk fields its shapes leave open (``num_heads`` of a DeiT).
    ``heldout_fraction``: the share of each class's kept images held out (``subsets.heldout_split``)."""
    from convit_ssl import data, engine
    from convit_ssl.checkpoint import checkpoint_file, load_trunk

    if not 0 <= heldout_fraction < 1:
        raise UsageError(f"--heldout-fraction {heldout_fraction:g} is outside [0, 1): pass e.g. 0.1 (0: nothing held "
                         f"out, the final epoch counts)")

    config_name = recipe_config(recipe)
    words = list(words)
    given = [word for word in words if word.startswith("config=")]
    if given:
        raise UsageError(f"{given[0]}: the recipe is --recipe NAME; give only KEY=VALUE overrides")
    source_file, trunk, model_info = None, None, {"source": "random", "recipe": recipe, "init_seed": seed}
    if checkpoint != "random":
        source_file = checkpoint_file(checkpoint)
        trunk, report = load_trunk(source_file, arch=arch, **dict(trunk_options or {}))
        model_info = {"source": "checkpoint", "checkpoint": str(source_file), "sha256": file_sha256(source_file),
                      "format": report.source_format, "arch": report.arch}
        words = checkpoint_words(source_file, trunk) + words
    probe = engine.compose([f"config={config_name}", *words])  # writes nothing: the checks below need the config
    dataset = probe.CONVIT_SSL.DATASET
    train_split = data.open_split(dataset, "train")
    files = [path for path, _ in train_split.samples]
    targets = np.asarray(train_split.targets)
    check_head(probe, train_split.classes, dataset)
    if trunk is not None:
        check_initial_trunk(probe, trunk)
    subset = choose_labels(labels, targets, files, train_split.classes, seed, heldout_fraction)
    world = probe.DISTRIBUTED.NUM_NODES * probe.DISTRIBUTED.NUM_PROC_PER_NODE
    if fit_batch and len(subset.train) < probe.DATA.TRAIN.BATCHSIZE_PER_REPLICA * world:
        batch = max(1, len(subset.train) // world)
        print(f"{len(subset.train)} training images: batch {batch} per process instead of the recipe's "
              f"{probe.DATA.TRAIN.BATCHSIZE_PER_REPLICA}", flush=True)
        words.append(f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}")
    run_dir = next((Path(word.partition("=")[2]) for word in words if word.startswith("run_dir=")), None)
    if run_dir is None:
        run_dir = default_run_dir(recipe, "random" if source_file is None else model_info["sha256"][:8],
                                  subset.spec, [config_name, model_info.get("sha256", "random"), subset.spec,
                                                str(seed), *sorted(words), *_heldout_part(heldout_fraction)])
        words.append(f"run_dir={run_dir}")
    run_dir = Path(run_dir).resolve()
    folder = run_dir / INPUTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = write_file_list(folder, "train", [files[i] for i in subset.train],
                                                 targets[subset.train])
    heldout_images, heldout_labels = write_file_list(folder, "heldout", [files[i] for i in subset.heldout],
                                                     targets[subset.heldout])
    words = [f"config={config_name}", *words,
             f"config.DATA.TRAIN.DATA_PATHS=['{train_images}']", f"config.DATA.TRAIN.LABEL_PATHS=['{train_labels}']",
             f"config.SEED_VALUE={seed}"]
    if len(subset.heldout):
        words += [f"config.CONVIT_SSL.HELDOUT_IMAGES='{heldout_images}'",
                  f"config.CONVIT_SSL.HELDOUT_LABELS='{heldout_labels}'"]
    if trunk is not None:
        words.append(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE='{write_initial_trunk(trunk.state_dict(), folder)}'")
    label_subset = {**subset.describe(targets, train_split.classes), "seed": seed,
                    "heldout_fraction": heldout_fraction, "train_list": str(train_images),
                    "heldout_list": str(heldout_images)}
    return Prepared(words, run_dir, recipe, dataset, model_info, label_subset, seed, checkpoint)


def write_result(prepared: Prepared, started: float, name: Optional[str] = None, out: Optional[Path] = None,
                 args: Optional[Mapping] = None) -> dict:
    """The result of a trained fine-tuning (from its ``finetune_eval.jsonl``) as a new JSON file in ``out``
    (default: the run folder); returns it with its ``file``."""
    epochs = read_evaluations(prepared.run_dir)
    chosen = summarise(epochs)
    name = name or ("random init" if prepared.model_info["source"] == "random" else prepared.checkpoint)
    labels = prepared.label_subset["labels"]
    subset_record = {key: prepared.label_subset[key] for key in ("labels", "seed", "train_list", "heldout_list")}
    result = {
        "kind": "finetune", "recipe": prepared.recipe, "dataset": prepared.dataset, "run_dir": str(prepared.run_dir),
        "label_subset": prepared.label_subset, "chosen": chosen, "epochs": epochs,
        "manifest": {**make_manifest([{"name": name, **prepared.model_info}], dict(args or {}),
                                     {"seed": prepared.seed}, started),
                     "label_subset": subset_record},
        "rows": result_rows(name, prepared.dataset, labels, chosen),
    }
    path = write_new_result(result, Path(out) if out else prepared.run_dir,
                            f"finetune-{slug(prepared.recipe)}-{slug(labels)}")
    return {**result, "file": str(path)}


def finetune(checkpoint: str, recipe: str, labels: Optional[str] = None, words: Sequence[str] = (),
             seed: int = 0, name: Optional[str] = None, arch: Optional[str] = None,
             out: Optional[Path] = None, fit_batch: bool = False, trunk_options: Optional[Mapping] = None,
             heldout_fraction: float = HELDOUT_FRACTION) -> dict:
    """Prepare, train on this machine (``engine.train``: one process per GPU) and write the result."""
    from convit_ssl import engine

    started = time.time()
    prepared = prepare(checkpoint, recipe, labels, words, seed, arch, fit_batch, trunk_options, heldout_fraction)
    config = engine.compose(prepared.words)
    subset = prepared.label_subset
    print(f"fine-tuning {name or checkpoint} on {subset['labels']} of {prepared.dataset}'s labels "
          f"({subset['train_images']} training, {subset['heldout_images']} held-out images); run folder: "
          f"{prepared.run_dir}", flush=True)
    engine.train(config)
    return write_result(prepared, started, name, out, {"checkpoint": checkpoint, "recipe": recipe,
                                                       "labels": subset["labels"], "words": list(words)})
