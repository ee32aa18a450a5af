"""Low-data study: how a ConViT and its DeiT twin compare when only a fraction of the labels is kept.

The paper's Table 2 (ConViT-S vs DeiT-S trained from scratch on per-class subsets of ImageNet: at 5% of the
labels 47.8 vs 34.8 top-1, a relative gain of 37%, shrinking to 2% with all labels) is the model. Here the two
trunks are frozen and probed: for each fraction f of the training labels per class (``subsets.class_subset``,
nested across fractions for one seed), a linear-probe grid (``linear_probe.probe_features``) and optionally kNN
on the same images. The two models are either a preset and its twin with ``local_up_to_layer=0`` (same size,
same seed; random init unless checkpoints are given) or two checkpoints, e.g. the ConViT and DeiT runs of
``convit-ssl train``. Features are extracted once per model and split, then every fraction reuses them.

Optionally (``scratch_epochs``) each random-init trunk is also trained from scratch with a head on every subset,
for ``scratch_epochs / f`` epochs, as the paper does (``scratch.train_supervised``; slow on CPU).

Output folder: one result JSON per model and fraction (``probe-<model>-f<fraction>.json``, ``scratch-...``), and
``study.json`` (the comparison table, with the relative gain (a - b) / b of the first model over the second),
``study.md``, ``study.csv`` and ``low_data.png`` (top-1 against the fraction, log scale, gains annotated).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from convit_ssl import atomic
from convit_ssl.errors import UsageError
from convit_ssl.evaluation.features import (
    check_feature_choices, frozen_check, split_features, state_digest, trunk_keys,
)
from convit_ssl.evaluation.knn import TEMPERATURE, knn_classify
from convit_ssl.evaluation.linear_probe import Recipe, probe_features
from convit_ssl.evaluation.results import csv_text, make_manifest, markdown_table, slug, write_result
from convit_ssl.evaluation.scratch import scaled_epochs, train_supervised
from convit_ssl.evaluation.subsets import FRACTIONS, class_subset


@dataclass
class StudyModel:
    """A trunk in the study and its description for the manifests (``name`` labels it in tables)."""

    name: str
    trunk: nn.Module
    info: dict


def twin_models(arch: str, seed: int = 0, names: Sequence[str] = ("ConViT", "DeiT"), **options) -> List[StudyModel]:
    """A random-init preset and its DeiT twin (``local_up_to_layer=0``), each built after ``manual_seed(seed)``."""
    from convit_ssl.models import create_trunk

    models = []
    for name, extra in zip(names, ({}, {"local_up_to_layer": 0})):
        kwargs = {**options, **extra}
        torch.manual_seed(seed)
        info = {"name": name, "source": "random", "arch": arch, "options": kwargs, "init_seed": seed}
        models.append(StudyModel(name, create_trunk(arch, **kwargs), info))
    return models


def relative_gain(value: float, baseline: float) -> Optional[float]:
    """(value - baseline) / baseline in percent; None for a zero baseline."""
    return 100.0 * (value - baseline) / baseline if baseline else None


def low_data_study(models: Sequence[StudyModel], recipe: Recipe, out_dir: Path, dataset: Optional[str] = None,
                   fractions: Sequence[float] = FRACTIONS, subset_rule: str = "random", seed: int = 0,
                   knn_ks: Optional[Sequence[int]] = None, temperature: float = TEMPERATURE,
                   scratch_epochs: Optional[int] = None, cache_dir: Optional[Path] = None, num_workers: int = 0,
                   args: Optional[Mapping] = None, progress: bool = False) -> dict:
    """Run the study for two models (the first is compared with the second); returns what ``study.json`` holds.

    ``knn_ks``: also run kNN (on ``recipe.features[0]``) with these k; k above a subset's size are skipped.
    ``scratch_epochs``: also train a copy of each (random-init) trunk with a head from scratch on every subset,
    for ``scratch_epochs / f`` epochs (``scratch.train_supervised``), the paper's own protocol.
    """
    if len(models) != 2:
        raise UsageError(f"the low-data study compares two models (a ConViT and its DeiT twin), got {len(models)}")
    if recipe.stream:
        raise UsageError("the low-data study probes features extracted once per model; pass --no-stream "
                         "(or a recipe with stream: false)")
    if scratch_epochs and any(model.info.get("source") != "random" for model in models):
        raise UsageError("training from scratch needs random-init models: drop --checkpoints, or drop --from-scratch")
    started = time.time()
    dataset = dataset or recipe.dataset
    out_dir = Path(out_dir)
    fractions = sorted(fractions)
    args = dict(args or {})
    seeds = {"seed": seed}
    results: Dict[str, Dict[float, dict]] = {}
    files: List[str] = []
    for model in models:
        model_started = time.time()
        digest = state_digest(model.trunk)
        sizes = check_feature_choices(model.trunk, recipe.features, recipe.image_size)
        keys = trunk_keys(recipe.features)
        run = dict(batch_size=recipe.batch_size, num_workers=num_workers, cache_dir=cache_dir, trunk_digest=digest,
                   model=model.info, progress=progress)
        train = split_features(model.trunk, dataset, "train", keys, recipe.preprocess, **run)
        test = split_features(model.trunk, dataset, "val", keys, recipe.preprocess, **run)
        device = next(model.trunk.parameters()).device
        bodies = {}
        for fraction in fractions:
            bodies[fraction] = probe_features(train, test, recipe, fraction, subset_rule, seed, dataset, model.name,
                                              device=device)
            if knn_ks:
                memory = class_subset(train.labels, fraction, seed, subset_rule, train.files)
                usable = [k for k in knn_ks if k <= len(memory)]
                choice = recipe.features[0]
                bodies[fraction]["knn"] = {
                    "feature": choice, "temperature": temperature, "skipped_ks": [k for k in knn_ks if k not in usable],
                    "accuracy": {str(k): value for k, value in knn_classify(
                        train.choice(choice, memory), train.labels[memory], test.choice(choice), test.labels, usable,
                        temperature, num_classes=len(train.classes)).items()},
                }
        check = frozen_check(model.trunk, digest, sizes)
        manifest = make_manifest([model.info], args, seeds, model_started)
        for fraction, body in bodies.items():
            body.update(trunk=check, manifest=manifest)
            for entry in body["rows"]:
                entry["kind"] = "low_data_probe"
            path = write_result(body, out_dir / f"probe-{slug(model.name)}-f{fraction:g}.json")
            files.append(path.name)
            if scratch_epochs:
                scratch_started = time.time()
                indices = class_subset(train.labels, fraction, seed, subset_rule, train.files)
                trained = train_supervised(copy.deepcopy(model.trunk), dataset, recipe, indices,
                                           scaled_epochs(scratch_epochs, fraction), seed, num_workers)
                body["scratch"] = trained
                path = write_result({
                    "kind": "low_data_scratch", "dataset": {"name": dataset, "fraction": fraction,
                                                            "subset_rule": subset_rule},
                    "base_epochs": scratch_epochs, "result": trained,
                    "manifest": make_manifest([model.info], args, seeds, scratch_started),
                    "rows": [{"kind": "low_data_scratch", "model": model.name, "dataset": dataset,
                              "fraction": fraction, "epochs": trained["epochs"], "top1": trained["top1"],
                              "top5": trained["top5"]}],
                }, out_dir / f"scratch-{slug(model.name)}-f{fraction:g}.json")
                files.append(path.name)
        results[model.name] = bodies

    first, second = (model.name for model in models)
    table = []
    for fraction in fractions:
        a, b = (results[name][fraction]["chosen"] for name in (first, second))
        row = {"fraction": fraction, f"top1 {first}": a["test_top1"], f"top1 {second}": b["test_top1"],
               "gain top1 (%)": relative_gain(a["test_top1"], b["test_top1"]),
               f"top5 {first}": a["test_top5"], f"top5 {second}": b["test_top5"],
               "gain top5 (%)": relative_gain(a["test_top5"], b["test_top5"]),
               "train images": results[first][fraction]["dataset"]["train"]
               + results[first][fraction]["dataset"]["heldout"]}
        if knn_ks:
            for name in (first, second):
                for k, value in results[name][fraction]["knn"]["accuracy"].items():
                    row[f"knn{k} top1 {name}"] = value["top1"]
        if scratch_epochs:
            a, b = (results[name][fraction]["scratch"]["top1"] for name in (first, second))
            row.update({f"scratch top1 {first}": a, f"scratch top1 {second}": b,
                        "scratch gain top1 (%)": relative_gain(a, b)})
        table.append(row)
    plot_path = out_dir / "low_data.png"
    plot_low_data(table, (first, second), dataset, plot_path)
    atomic.write_text(markdown_table(table), out_dir / "study.md")
    atomic.write_text(csv_text(table), out_dir / "study.csv")
    study = {
        "kind": "low_data_study", "dataset": dataset, "fractions": fractions, "subset_rule": subset_rule,
        "models": [first, second], "table": table, "files": files, "plot": plot_path.name,
        "manifest": make_manifest([model.info for model in models], args, seeds, started),
        "rows": [],  # the per-model, per-fraction rows are in the probe files beside it
    }
    write_result(study, out_dir / "study.json")
    return study


def plot_low_data(table: Sequence[Mapping], names: Sequence[str], dataset: str, path: Path) -> Path:
    """PNG of top-1 against the label fraction for both models, the first one's relative gain annotated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    percent = [100 * row["fraction"] for row in table]
    for name, marker, color in zip(names, ("o", "s"), ("tab:blue", "tab:orange")):
        axes.plot(percent, [row[f"top1 {name}"] for row in table], marker=marker, color=color,
                  label=f"{name}, linear probe")
        if f"scratch top1 {name}" in table[0]:
            axes.plot(percent, [row[f"scratch top1 {name}"] for row in table], marker=marker, color=color,
                      linestyle="--", label=f"{name}, trained from scratch")
    for x, row in zip(percent, table):
        gain = row["gain top1 (%)"]
        if gain is not None:
            axes.annotate(f"{gain:+.0f}%", (x, row[f"top1 {names[0]}"]), textcoords="offset points", xytext=(0, 7),
                          ha="center", fontsize=8)
    axes.margins(y=0.12)  # room for the gain labels
    axes.set_xscale("log")
    axes.set_xticks(percent, [f"{value:g}%" for value in percent])
    axes.set_xlabel("labelled training images kept per class")
    axes.set_ylabel("top-1 (%)")
    axes.set_title(f"{dataset}: {names[0]} vs {names[1]} (relative gain of the linear probe annotated)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic.open_atomic(path, "wb") as stream:
        figure.savefig(stream, format="png")
    return path
