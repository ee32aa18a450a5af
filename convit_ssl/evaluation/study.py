"""Low-data study: how a ConViT and its DeiT twin compare when only a fraction of the labels is kept.

The paper's Table 2 (ConViT-S vs DeiT-S trained from scratch on per-class subsets of ImageNet: at 5% of the
labels 47.8 vs 34.8 top-1, a relative gain of 37%, shrinking to 2% with all labels) is the model. Here the two
trunks are frozen and probed: for each fraction f of the training labels per class (``subsets.class_subset``,
nested across fractions for one seed), a linear-probe grid (``linear_probe.probe_features``) and optionally kNN
on the same images. The two models are either a preset and its twin with ``local_up_to_layer=0`` (same size,
same seed; random init unless checkpoints are given) or two checkpoints, e.g. the ConViT and DeiT runs of
``convit-ssl train``. Features are extracted once per model and split, then every fraction reuses them.
Several pairs can share one table, one row per pair and fraction: e.g. two SSL checkpoints and random-init trunks
of their shapes (``random_twins``), the "SSL vs random init" half of the question.

Optionally (``finetune_epochs``) each trunk, random or pretrained, is also fine-tuned with a new head on every
subset through VISSL's engine (``evaluation.finetune``, the fine-tuning recipe ``finetune_recipe``), for
``finetune_epochs / f`` epochs as the paper does (slow on CPU); its test top-1 is that of the epoch best on the
subset's held-out images.

Output folder: one result JSON per model and fraction (``probe-<model>-<init>-f<fraction>.json``, with init
``random`` or ``checkpoint``; ``finetune-...``, the fine-tunings' run folders in ``finetune/``, the trunks they
start from in ``trunks/``), and ``study.json`` (the comparison table, with the relative gain (a - b) / b of the
first model of each pair over the second),
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
from convit_ssl.evaluation.arguments import check_label_subsets
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

    @property
    def init(self) -> str:
        """``random`` or ``checkpoint``: where the trunk's weights come from."""
        return self.info["source"]

    @property
    def label(self) -> str:
        """Name and init (``ConViT random``): what its result rows and files are called."""
        return f"{self.name} {self.init}"


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


def random_twins(models: Sequence[StudyModel], arch: str = "convit_tiny", seed: int = 0) -> List[StudyModel]:
    """Random-init trunks of preset ``arch`` with the shapes of ``models``' trunks (``finetune.trunk_shape``), same
    names, each built after ``manual_seed(seed)`` (so a twin of ``twin_models``' trunk is that very trunk)."""
    from convit_ssl.evaluation.finetune import trunk_shape
    from convit_ssl.models import create_trunk

    twins = []
    for model in models:
        shape = trunk_shape(model.trunk)
        torch.manual_seed(seed)
        info = {"name": model.name, "source": "random", "arch": arch, "options": shape, "init_seed": seed}
        twins.append(StudyModel(model.name, create_trunk(arch, **shape), info))
    return twins


def finetune_fraction(model: StudyModel, trunk_file: Path, recipe: str, fraction: float, base_epochs: int, seed: int,
                      out_dir: Path, words: Sequence[str] = ()) -> dict:
    """Fine-tune ``model``'s trunk, saved in ``trunk_file``, on ``fraction`` of the labels for ``base_epochs / fraction``
    epochs (``evaluation.finetune``; run folder ``out_dir/finetune/<name>-f<fraction>``, result JSON in
    ``out_dir``); returns its epochs and the test accuracy of the epoch best on the held-out images (of the final
    epoch when the subset holds none out), with the result file's name."""
    from convit_ssl.evaluation.finetune import finetune, scaled_epochs, trunk_shape

    epochs = scaled_epochs(base_epochs, fraction)
    run_dir = out_dir / "finetune" / f"{slug(model.label)}-f{fraction:g}"
    result = finetune(str(trunk_file), recipe, labels=f"{100 * fraction:g}%", seed=seed, name=model.label,
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
    """Run the study for pairs of models (``models`` in order: the first of each pair is compared with the second,
    every pair named like the first, e.g. ConViT and DeiT, and differing in init); returns what ``study.json`` holds.

    ``knn_ks``: also run kNN (on ``recipe.features[0]``) with these k; k above a subset's size are skipped.
    ``finetune_epochs``: also fine-tune each trunk with a new head on every subset for ``finetune_epochs / f`` epochs
    (``finetune_fraction``), the paper's own protocol; ``finetune_words`` are ``KEY=VALUE`` words of the runs.
    """
    if len(models) < 2 or len(models) % 2:
        raise UsageError(f"the low-data study compares pairs of models (a ConViT and its DeiT twin), "
                         f"got {len(models)}")
    pairs = [(models[start], models[start + 1]) for start in range(0, len(models), 2)]
    names = [model.name for model in pairs[0]]
    named_alike = all([first.name, second.name] == names for first, second in pairs)
    one_init_per_pair = all(first.init == second.init for first, second in pairs)
    inits = [first.init for first, _ in pairs]
    if not (named_alike and one_init_per_pair and len(set(inits)) == len(inits)):
        raise UsageError(f"the study's pairs share the names {' and '.join(names)} and differ in init, got "
                         f"{', '.join(model.label for model in models)}")
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
    check_label_subsets(dataset, fractions, subset_rule, seed)
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
            bodies[fraction] = probe_features(train, test, recipe, fraction, subset_rule, seed, dataset, model.label,
                                              device=device)
            if knn_ks:
                memory = class_subset(train.labels, fraction, seed, subset_rule, train.files)
                usable = [k for k in knn_ks if k <= len(memory)]
                choice = recipe.features[0]
                bodies[fraction]["knn"] = {
                    "feature": choice, "temperature": temperature, "skipped_ks": [k for k in knn_ks if k not in usable],
                    "accuracy": {str(k): value for k, value in knn_classify(
                        train.choice(choice, memory), train.labels[memory], test.choice(choice), test.labels, usable,
                        temperature, num_classes=len(train.classes)).items()} if usable else {},
                }
        check = frozen_check(model.trunk, digest, sizes)
        trunk_file = out_dir / "trunks" / f"{slug(model.label)}.pth"
        if finetune_epochs:
            atomic.torch_save(model.trunk.state_dict(), trunk_file)
        manifest = make_manifest([model.info], args, seeds, model_started)
        for fraction, body in bodies.items():
            body.update(trunk=check, manifest=manifest)
            for entry in body["rows"]:
                entry["kind"] = "low_data_probe"
            path = write_result(body, out_dir / f"probe-{slug(model.label)}-f{fraction:g}.json")
            files.append(path.name)
            if finetune_epochs:
                body["finetune"] = finetune_fraction(model, trunk_file, finetune_recipe or dataset, fraction,
                                                     finetune_epochs, seed, out_dir, finetune_words)
                files.append(body["finetune"]["file"])
        results[model.label] = bodies

    table = []
    for pair in pairs:
        for fraction in fractions:
            bodies = [results[model.label][fraction] for model in pair]
            table.append(_table_row(pair[0].init, fraction, names, bodies))
    plot_path = out_dir / "low_data.png"
    plot_low_data(table, names, dataset, plot_path)
    atomic.write_text(markdown_table(table), out_dir / "study.md")
    atomic.write_text(csv_text(table), out_dir / "study.csv")
    study = {
        "kind": "low_data_study", "dataset": dataset, "fractions": fractions, "subset_rule": subset_rule,
        "models": [model.label for model in models], "table": table, "files": files, "plot": plot_path.name,
        "manifest": make_manifest([model.info for model in models], args, seeds, started),
        "rows": [],  # the per-model, per-fraction rows are in the probe files beside it
    }
    write_result(study, out_dir / "study.json")
    return study


def _table_row(init: str, fraction: float, names: Sequence[str], bodies: Sequence[Mapping]) -> dict:
    """The study table's row of a pair of models (``names``, their probe result ``bodies``) at ``fraction``."""
    a, b = (body["chosen"] for body in bodies)
    row = {"fraction": fraction, "init": init, f"top1 {names[0]}": a["test_top1"], f"top1 {names[1]}": b["test_top1"],
           "gain top1 (%)": relative_gain(a["test_top1"], b["test_top1"]),
           f"top5 {names[0]}": a["test_top5"], f"top5 {names[1]}": b["test_top5"],
           "gain top5 (%)": relative_gain(a["test_top5"], b["test_top5"]),
           "train images": bodies[0]["dataset"]["train"] + bodies[0]["dataset"]["heldout"]}
    for name, body in zip(names, bodies):
        for k, value in body.get("knn", {}).get("accuracy", {}).items():
            row[f"knn{k} top1 {name}"] = value["top1"]
    if "finetune" in bodies[0]:
        a, b = (body["finetune"]["top1"] for body in bodies)
        row.update({f"finetune top1 {names[0]}": a, f"finetune top1 {names[1]}": b,
                    "finetune gain top1 (%)": relative_gain(a, b)})
    return row


def plot_low_data(table: Sequence[Mapping], names: Sequence[str], dataset: str, path: Path) -> Path:
    """PNG of top-1 against the label fraction for both models of each init (one marker per init), the first
    model's relative gain annotated: that of fine-tuning when the table has it, else that of the linear probe."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    finetuned = f"finetune top1 {names[0]}" in table[0]
    annotated, gain_key = ("finetune top1", "finetune gain top1 (%)") if finetuned else ("top1", "gain top1 (%)")
    inits = list(dict.fromkeys(row["init"] for row in table))
    for init, marker in zip(inits, ("o", "s", "^", "v")):
        rows = [row for row in table if row["init"] == init]
        percent = [100 * row["fraction"] for row in rows]
        for name, color in zip(names, ("tab:blue", "tab:orange")):
            axes.plot(percent, [row[f"top1 {name}"] for row in rows], marker=marker, color=color,
                      label=f"{name} {init}, linear probe")
            if finetuned:
                axes.plot(percent, [row[f"finetune top1 {name}"] for row in rows], marker=marker, color=color,
                          linestyle="--", label=f"{name} {init}, fine-tuned")
        for x, row in zip(percent, rows):
            if row[gain_key] is not None:
                axes.annotate(f"{row[gain_key]:+.0f}%", (x, row[f"{annotated} {names[0]}"]), textcoords="offset points",
                              xytext=(0, 7), ha="center", fontsize=8)
    percent = sorted({100 * row["fraction"] for row in table})
    axes.margins(y=0.12)  # room for the gain labels
    axes.set_xscale("log")
    axes.set_xticks(percent, [f"{value:g}%" for value in percent])
    axes.set_xlabel("labelled training images kept per class")
    axes.set_ylabel("top-1 (%)")
    evaluation = "fine-tuning" if finetuned else "the linear probe"
    axes.set_title(f"{dataset}: {names[0]} vs {names[1]} (relative gain of {evaluation} annotated)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7 if len(inits) > 1 else None)
    figure.tight_layout()
    with atomic.open_atomic(path, "wb") as stream:
        figure.savefig(stream, format="png")
    return path
