"""Low-data study: how a ConViT and its DeiT twin compare when only a fraction of the labels is kept.

The paper's Table 2 (ConViT-S vs DeiT-S trained from scratch on per-class subsets of ImageNet: at 5% of the
labels 47.8 vs 34.8 top-1, a relative gain of 37%, shrinking to 2% with all labels) is the model. Here the two
trunks are frozen and probed: for each fraction f of the training labels per class (``subsets.class_subset``,
nested across fractions for one seed), a linear-probe grid (``linear_probe.probe_features``) and optionally kNN
on the same images. The two models are either a preset and its twin with ``local_up_to_layer=0`` (same size,
same seed; random init unless checkpoints are given) or two checkpoints, e.g. the ConViT and DeiT runs of
``convit-ssl train``. Features are extracted once per model and split, then every fraction reuses them.

Optionally (``finetune_epochs``) each trunk, random or pretrained, is also fine-tuned with a new head on every
subset through VISSL's engine (``evaluation.finetune``, the fine-tuning recipe ``finetune_recipe``), for
``finetune_epochs / f`` epochs as the paper does (slow on CPU); its test top-1 is that of the epoch best on the
subset's held-out images.

Output folder: one result JSON per model and fraction (``probe-<model>-f<fraction>.json``, ``finetune-...``,
the fine-tunings' run folders in ``finetune/``, the trunks they start from in ``trunks/``), and
``study.json`` (the comparison table, with the relative gain (a - b) / b of the first model over the second),
``study.md``, ``study.csv`` and ``low_data.png`` (top-1 against the fraction, log scale, gains annotated).
"""
from __future__ import annotations

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


def finetune_fraction(model: StudyModel, trunk_file: Path, recipe: str, fraction: float, base_epochs: int, seed: int,
                      out_dir: Path, words: Sequence[str] = ()) -> dict:
    """Fine-tune ``model``'s trunk, saved in ``trunk_file``, on ``fraction`` of the labels for ``base_epochs / fraction``
    epochs (``evaluation.finetune``; run folder ``out_dir/finetune/<name>-f<fraction>``, result JSON in
    ``out_dir``); returns its epochs and the test accuracy of the epoch best on the held-out images (of the final
    epoch when the subset holds none out), with the result file's name."""
    from convit_ssl.evaluation.finetune import finetune, scaled_epochs, trunk_shape

    epochs = scaled_epochs(base_epochs, fraction)
    run_dir = out_dir / "finetune" / f"{slug(model.name)}-f{fraction:g}"
    result = finetune(str(trunk_file), recipe, labels=f"{100 * fraction:g}%", seed=seed, name=model.name,
                      out=out_dir, fit_batch=True, trunk_options=trunk_shape(model.trunk),
                      words=[*words, f"config.OPTIMIZER.num_epochs={epochs}", f"run_dir={run_dir}"])
    selected_on = "heldout" if result["chosen"]["heldout"] is not None else "final"
    chosen = result["chosen"][selected_on]
    return {"epochs": epochs, "selected_on": selected_on, "epoch": chosen["epoch"], "top1": chosen["test_top1"],
            "top5": chosen["test_top5"], "file": Path(result["file"]).name}


def relative_gain(value: float, baseline: float) -> Optional[float]:
    """(value - baseline) / baseline in percent; None for a zero baseline."""
    return 100.0 * (value - baseline) / baseline if baseline else None


def low_data_study(models: Sequence[StudyModel], recipe: Recipe, out_dir: Path, dataset: Optional[str] = None,
                   fractions: Sequence[float] = FRACTIONS, subset_rule: str = "random", seed: int = 0,
                   knn_ks: Optional[Sequence[int]] = None, temperature: float = TEMPERATURE,
                   finetune_epochs: Optional[int] = None, finetune_recipe: Optional[str] = None,
                   finetune_words: Sequence[str] = (), cache_dir: Optional[Path] = None, num_workers: int = 0,
                   args: Optional[Mapping] = None, progress: bool = False) -> dict:
    """Run the study for two models (the first is compared with the second); returns what ``study.json`` holds.

    ``knn_ks``: also run kNN (on ``recipe.features[0]``) with these k; k above a subset's size are skipped.
    ``finetune_epochs``: also fine-tune each trunk with a new head on every subset for ``finetune_epochs / f`` epochs
    (``finetune_fraction``), the paper's own protocol; ``finetune_words`` are ``KEY=VALUE`` words of the runs.
    """
    if len(models) != 2:
        raise UsageError(f"the low-data study compares two models (a ConViT and its DeiT twin), got {len(models)}")
    if recipe.stream:
        raise UsageError("the low-data study probes features extracted once per model; pass --no-stream "
                         "(or a recipe with stream: false)")
    if finetune_epochs and subset_rule != "random":
        raise UsageError(f"fine-tuning takes the per-class subsets of the 'random' rule: drop --subset-rule "
                         f"{subset_rule}, or drop --finetune")
    if finetune_epochs:
        from convit_ssl.evaluation.finetune import recipe_config

        recipe_config(finetune_recipe or dataset or recipe.dataset)  # an unknown recipe fails now, not after a probe
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
        trunk_file = out_dir / "trunks" / f"{slug(model.name)}.pth"
        if finetune_epochs:
            atomic.torch_save(model.trunk.state_dict(), trunk_file)
        manifest = make_manifest([model.info], args, seeds, model_started)
        for fraction, body in bodies.items():
            body.update(trunk=check, manifest=manifest)
            for entry in body["rows"]:
                entry["kind"] = "low_data_probe"
            path = write_result(body, out_dir / f"probe-{slug(model.name)}-f{fraction:g}.json")
            files.append(path.name)
            if finetune_epochs:
                body["finetune"] = finetune_fraction(model, trunk_file, finetune_recipe or dataset, fraction,
                                                     finetune_epochs, seed, out_dir, finetune_words)
                files.append(body["finetune"]["file"])
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
        if finetune_epochs:
            a, b = (results[name][fraction]["finetune"]["top1"] for name in (first, second))
            row.update({f"finetune top1 {first}": a, f"finetune top1 {second}": b,
                        "finetune gain top1 (%)": relative_gain(a, b)})
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
        if f"finetune top1 {name}" in table[0]:
            axes.plot(percent, [row[f"finetune top1 {name}"] for row in table], marker=marker, color=color,
                      linestyle="--", label=f"{name}, fine-tuned")
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
