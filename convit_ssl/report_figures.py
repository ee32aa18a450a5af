"""The figures of ``convit-ssl report`` (see ``convit_ssl.report``), drawn from gating records and diagnostics.

Figures are drawn on matplotlib ``Figure`` objects (Agg canvas, no pyplot state) at a fixed size:
``FIGURE_INCHES`` x ``DPI`` pixels. Layers and heads are numbered from 1, as in the paper.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Mapping, Sequence

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from convit_ssl import atomic
from convit_ssl.diagnostics import CONVOLUTIONAL_GATE, DIAGNOSTIC_TENSORS, DISTANCE_KINDS, diagnostics_from_record

DPI = 100
FIGURE_INCHES = {
    "gates_final": (8.0, 5.0),
    "gate_trajectories": (12.0, 7.0),
    "attention_distance": (15.0, 4.5),
    "attention_maps": (12.0, 7.5),
    "training_health": (15.0, 4.5),
}
_RUN_STYLES = ("-", "--")  # line styles of the first and second run of a comparison


def trajectories(records: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """Records as tensors: ``iterations`` (T,), ``gates`` and ``<kind>_distance`` (T, L, H)."""
    per_record = [diagnostics_from_record(record) for record in records]
    result = {"iterations": torch.tensor([r["iteration"] for r in records], dtype=torch.float64)}
    for key in DIAGNOSTIC_TENSORS:
        result[key] = torch.stack([diagnostics[key] for diagnostics in per_record])
    return result

def _new_figure(kind: str) -> Figure:
    return Figure(figsize=FIGURE_INCHES[kind], dpi=DPI, layout="constrained")


def _save(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` as PNG, atomically: a report killed while drawing leaves the previous figure."""
    with atomic.open_atomic(path, "wb") as stream:
        figure.savefig(stream, format="png", dpi=DPI)
    return path


def plot_gate_heatmap(gates: torch.Tensor, path: str | os.PathLike, title: str) -> Path:
    """Heatmap of gates (L, H): one row per GPSA layer, one column per head, values written in."""
    figure = _new_figure("gates_final")
    ax = figure.add_subplot()
    image = ax.imshow(gates.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    num_layers, num_heads = gates.shape
    if num_layers * num_heads <= 200:
        for layer in range(num_layers):
            for head in range(num_heads):
                value = gates[layer, head].item()
                ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 else "white")
    ax.set_xticks(range(num_heads), [str(h + 1) for h in range(num_heads)])
    ax.set_yticks(range(num_layers), [str(layer + 1) for layer in range(num_layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("GPSA layer")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="gate sigmoid(gating)")
    return _save(figure, Path(path))


def plot_gate_trajectories(runs: Mapping[str, Sequence[dict]], path: str | os.PathLike) -> Path:
    """Gates over training, one panel per layer: every head (one run) or each run's head mean (several)."""
    figure = _new_figure("gate_trajectories")
    series = {label: trajectories(records) for label, records in runs.items()}
    num_layers = max(s["gates"].shape[1] for s in series.values())
    columns = min(5, num_layers)
    axes = figure.subplots(math.ceil(num_layers / columns), columns, squeeze=False, sharex=True, sharey=True)
    for index, ax in enumerate(axes.flat):
        if index >= num_layers:
            ax.set_axis_off()
            continue
        for run_index, (label, s) in enumerate(series.items()):
            if index >= s["gates"].shape[1]:
                continue
            gates = s["gates"][:, index]
            if len(series) == 1:
                ax.plot(s["iterations"], gates, linewidth=0.8, alpha=0.6)
            ax.plot(s["iterations"], gates.mean(dim=1), color="black", linewidth=2,
                    marker="o" if len(s["iterations"]) <= 20 else None, markersize=3,
                    linestyle=_RUN_STYLES[run_index % len(_RUN_STYLES)], label=f"{label} (head mean)")
        ax.axhline(CONVOLUTIONAL_GATE, color="grey", linewidth=0.6, linestyle=":")
        ax.set_ylim(0, 1)
        ax.set_title(f"layer {index + 1}")
    axes.flat[0].legend(fontsize=7)
    figure.supxlabel("iteration")
    figure.supylabel("gate")
    return _save(figure, Path(path))


def plot_attention_distances(runs: Mapping[str, Sequence[dict]], path: str | os.PathLike) -> Path:
    """Head-averaged mean attention distance per layer over training, for positional, content, mixed."""
    figure = _new_figure("attention_distance")
    axes = figure.subplots(1, len(DISTANCE_KINDS), sharey=True)
    series = {label: trajectories(records) for label, records in runs.items()}
    num_layers = max(s["gates"].shape[1] for s in series.values())
    colours = [colormaps["viridis"](layer / max(1, num_layers - 1)) for layer in range(num_layers)]
    for ax, kind in zip(axes, DISTANCE_KINDS):
        for run_index, (label, s) in enumerate(series.items()):
            distances = s[f"{kind}_distance"].mean(dim=2)
            for layer in range(distances.shape[1]):
                name = f"layer {layer + 1}" + (f", {label}" if len(series) > 1 else "")
                ax.plot(s["iterations"], distances[:, layer], color=colours[layer],
                        linestyle=_RUN_STYLES[run_index % len(_RUN_STYLES)], label=name)
        ax.set_title(f"{kind} attention")
        ax.set_xlabel("iteration")
    axes[0].set_ylabel("mean attention distance (patches)")
    axes[-1].legend(fontsize=7, ncol=2 if len(series) > 1 else 1)
    return _save(figure, Path(path))


def plot_training_health(epochs: Sequence[dict], health: Sequence[dict], path: str | os.PathLike) -> Path:
    """Training loss over updates (health records' means, epochs' per-sample means), the embedding's and the
    trunk's feature std against the spread-out value 1/sqrt(D), and their effective ranks."""
    figure = _new_figure("training_health")
    loss_ax, std_ax, rank_ax = figure.subplots(1, 3)
    if health:
        updates = [r["iteration"] for r in health]
        loss_ax.plot(updates, [r["loss"] for r in health], linewidth=1, label="mean since the last record")
        std_ax.plot(updates, [r["feature_std"] for r in health], label="embedding (head output)")
        std_ax.plot(updates, [r["trunk_feature_std"] for r in health], label="trunk features (probe batch)")
        std_ax.axhline(health[-1]["feature_std_healthy"], color="grey", linestyle=":", label="1/sqrt(D), embedding")
        rank_ax.plot(updates, [r["effective_rank"] for r in health], label=f"embedding (D = {health[-1]['embedding_dim']})")
        rank_ax.plot(updates, [r["trunk_effective_rank"] for r in health], label=f"trunk (D = {health[-1]['trunk_dim']})")
        std_ax.legend(fontsize=7)
        rank_ax.legend(fontsize=7)
    if epochs:
        loss_ax.plot([r["iteration"] for r in epochs], [r["train_loss"] for r in epochs], "o", color="black",
                     markersize=4, label="epoch mean (metrics.json)")
    loss_ax.legend(fontsize=7)
    loss_ax.set_title("training loss per sample")
    std_ax.set_title("std of L2-normalised features")
    rank_ax.set_title("effective rank")
    for ax in (loss_ax, std_ax, rank_ax):
        ax.set_xlabel("updates")
    return _save(figure, Path(path))


def plot_attention_maps(maps: Mapping, image: torch.Tensor, block_row: int, path: str | os.PathLike) -> Path:
    """Image with the query patch, and per head (columns) the positional, content and mixed maps (rows).

    ``maps`` is an ``attention_maps`` result; ``block_row`` picks one of its blocks.
    """
    figure = _new_figure("attention_maps")
    heads = maps["heads"]
    axes = figure.subplots(len(DISTANCE_KINDS), 1 + len(heads), squeeze=False)
    row, col = maps["query"]
    grid_h, grid_w = maps["grid_size"]
    patch_h, patch_w = image.shape[1] / grid_h, image.shape[2] / grid_w
    axes[0, 0].imshow(image.permute(1, 2, 0).numpy())
    axes[0, 0].add_patch(Rectangle((col * patch_w - 0.5, row * patch_h - 0.5), patch_w, patch_h,
                                   fill=False, edgecolor="red", linewidth=1.5))
    axes[0, 0].set_title("image, query patch")
    for ax in axes[:, 0]:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[1:, 0]:
        ax.set_axis_off()
    for kind_row, kind in enumerate(DISTANCE_KINDS):
        for column, head in enumerate(heads, start=1):
            ax = axes[kind_row, column]
            values = maps[kind][block_row, column - 1]
            ax.imshow(values.numpy(), cmap="magma", vmin=0)  # each map on its own scale: where, not how much
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"max {values.max().item():.3f}", fontsize=7)
            if kind_row == 0:
                ax.set_title(f"head {head + 1}, gate {maps['gates'][block_row, column - 1].item():.2f}", fontsize=9)
            if column == 1:
                ax.set_ylabel(kind)
    figure.suptitle(f"layer {maps['blocks'][block_row] + 1}: where the query patch attends")
    return _save(figure, Path(path))
