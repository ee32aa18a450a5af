"""Figures and a Markdown summary of what the gates learned, for a run folder, a checkpoint or two runs.

A run folder is a VISSL checkpoint folder: checkpoints (``checkpoint.torch``, ``model_phase*.torch``,
``model_final_checkpoint_phase*.torch``), ``gating_metrics.jsonl`` written by
``convit_ssl.gating_hook.GatingDiagnosticsHook``, ``train_config.yaml``, and any evaluation result files
(``*.json`` with a ``top1`` entry). ``write_report`` draws, into ``<run>/report``:

* ``gates_final.png``: the final gates, layers x heads;
* ``gate_trajectories.png``: every head's gate over training, one panel per layer (needs the metrics);
* ``attention_distance.png``: mean attention distance per layer over training (needs the metrics);
* ``attention_maps_layer<n>.png``: positional, content and mixed attention of the centre patch for
  four heads (the two highest and the two lowest gates) of the first and last GPSA layer, on one image
  (``--image``, else the first image of the run's dataset, val split first, normalised as in training,
  else a fixed synthetic pattern);
* ``summary.md``: per layer the mean gate at the start and the end, whether it fell, which layers kept
  convolutional heads (gate > 0.5), attention distances, evaluation results.

Layers and heads are numbered from 1 in figures and text, as in the paper; JSON records keep the
0-based block index. Figures are drawn on matplotlib ``Figure`` objects (Agg canvas, no pyplot state)
at a fixed size: ``FIGURE_INCHES`` x ``DPI`` pixels.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from convit_ssl.checkpoint import checkpoint_file, load_trunk, run_checkpoint
from convit_ssl.data import read_catalog
from convit_ssl.diagnostics import DISTANCE_KINDS, attention_maps, gating_diagnostics
from convit_ssl.errors import UsageError
from convit_ssl.evaluation.features import IMAGENET_MEAN, IMAGENET_STD
from convit_ssl.evaluation.results import SCHEMA, gather, markdown_table, read_result
from convit_ssl.images import IMAGE_EXTENSIONS
from convit_ssl.models.convit import ConViT
from convit_ssl.run_folder import EPOCH_LOG, HEALTH_FILE, METRICS_FILE

REPORT_DIR = "report"
SUMMARY_FILE = "summary.md"
DPI = 100
FIGURE_INCHES = {
    "gates_final": (8.0, 5.0),
    "gate_trajectories": (12.0, 7.0),
    "attention_distance": (15.0, 4.5),
    "attention_maps": (12.0, 7.5),
    "training_health": (15.0, 4.5),
}
DEFAULT_RESULTS_DIR = Path("runs") / "eval"  # linear-probe's and knn's default --out
RESULT_COLUMNS = ["kind", "model", "dataset", "fraction", "feature", "k", "top1", "top5", "file"]
INITIAL_GATE = 1 / (1 + math.exp(-1))  # sigmoid(1): every GPSA gate at initialisation
CONVOLUTIONAL_GATE = 0.5  # a head above it puts more weight on positional than on content attention
GATE_RESOLUTION = 0.0005  # mean-gate changes below the summary's three decimals count as no change
MeanStd = Tuple[Sequence[float], Sequence[float]]
IMAGENET_MEAN_STD: MeanStd = (IMAGENET_MEAN, IMAGENET_STD)  # when the run's config does not say
PAPER_FINDING = (
    "Paper (ConViT-S, supervised ImageNet training): the head-averaged gate falls from 0.73 in every GPSA "
    "layer, to about 0 in layers 6-10, while layers 1-5 keep some heads with a high gate (layer 4: 0.82, "
    "0.82, 0.84, 0.75, 0.34, 0.14, 0.03, 0, 0)."
)
_RUN_STYLES = ("-", "--")


# ---------------------------------------------------------------- reading a run folder

def load_gating_metrics(path: str | os.PathLike, what: str = "gating record") -> List[dict]:
    """Records of a ``gating_metrics.jsonl`` (or ``health.jsonl``), sorted by iteration, the last record of an
    iteration kept.

    A resumed run appends records again from its checkpoint's iteration on; the later ones win. An
    unterminated last line (a job killed while writing) is ignored; any other bad line is an error.
    """
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]
    by_iteration: Dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_iteration[int(record["iteration"])] = record
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{path} line {number} is not a {what} ({error}): "
                             f"delete the line or the file and rerun the report")
    return [by_iteration[i] for i in sorted(by_iteration)]


def _top1_entries(node, prefix: str = "") -> List[Tuple[str, dict]]:
    """(dotted key path, dict) of every dict with a numeric ``top1`` inside a JSON value."""
    entries = []
    if isinstance(node, dict):
        if isinstance(node.get("top1", None), (int, float)):
            entries.append((prefix or "-", node))
        for key, value in node.items():
            entries += _top1_entries(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):  # e.g. a linear probe's summary rows
        for index, value in enumerate(node):
            entries += _top1_entries(value, f"{prefix}.{index}" if prefix else str(index))
    return entries


def find_results(run_dir: str | os.PathLike) -> List[dict]:
    """Plain result files of a run: every ``*.json`` under it with a ``top1`` entry (report folders and
    convit-ssl result files, which ``run_results`` reads, skipped).

    Returns rows ``{"file": path relative to run_dir, "entry": dotted key or "-", "top1": ..., "top5": ...}``.
    """
    run_dir = Path(run_dir)
    rows = []
    for path in sorted(run_dir.rglob("*.json")):
        if REPORT_DIR in path.relative_to(run_dir).parts[:-1]:
            continue
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # not a result file
        if isinstance(content, dict) and content.get("schema") == SCHEMA:
            continue
        for entry, values in _top1_entries(content):
            rows.append({"file": path.relative_to(run_dir).as_posix(), "entry": entry,
                         "top1": values["top1"], "top5": values.get("top5", None)})
    return rows


def result_folders(run_dir: str | os.PathLike, extra: Sequence[str | os.PathLike] = ()) -> List[Path]:
    """Where a run's evaluation results may be: the run folder, ``eval`` beside it (``runs/eval`` for
    ``runs/NAME``), ``runs/eval`` of the working folder (the default ``--out`` of linear-probe and knn), and
    ``extra``; existing folders only, each once."""
    run_dir = Path(run_dir)
    candidates = [run_dir, run_dir.parent / "eval", DEFAULT_RESULTS_DIR, *map(Path, extra)]
    folders: List[Path] = []
    for folder in candidates:
        if folder.is_dir() and folder.resolve() not in [f.resolve() for f in folders]:
            folders.append(folder)
    return folders


def run_results(run_dir: str | os.PathLike, folders: Sequence[str | os.PathLike]) -> List[dict]:
    """Rows of the convit-ssl result files under ``folders`` whose manifest names a checkpoint file of this run
    (a model whose ``file`` lies in ``run_dir``), each row with its ``file``."""
    run_dir = Path(run_dir).resolve()
    rows = []
    for row in gather(folders):
        result = read_result(row["file"])
        files = [model.get("file") for model in (result.get("manifest") or {}).get("models", [])]
        if any(file and Path(file).parent == run_dir for file in files):
            rows.append(row)
    return rows


def load_epoch_losses(run_dir: str | os.PathLike) -> List[dict]:
    """``metrics.json`` lines that hold a ``train_loss`` (written by ``convit_ssl.health``), in order."""
    path = Path(run_dir) / EPOCH_LOG
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed job
        if isinstance(record, dict) and isinstance(record.get("train_loss", None), (int, float)):
            lines.append(record)
    return lines


# ---------------------------------------------------------------- the sample image

def synthetic_image(size: Tuple[int, int]) -> torch.Tensor:
    """A fixed picture with edges and textures, (3, height, width) in [0, 1]: colour ramps, a disc, stripes."""
    height, width = size
    y = torch.linspace(0, 1, height).view(-1, 1).expand(height, width)
    x = torch.linspace(0, 1, width).view(1, -1).expand(height, width)
    disc = (((x - 0.35) ** 2 + (y - 0.4) ** 2) < 0.2**2).float()
    stripes = ((x * 8 + y * 4).floor() % 2) * (x > 0.6).float() * (y > 0.55).float()
    red = 0.2 + 0.6 * x * (1 - disc) + 0.8 * disc
    green = 0.2 + 0.6 * y * (1 - stripes)
    blue = 0.3 + 0.5 * stripes + 0.2 * (1 - disc) * (1 - y)
    return torch.stack([red, green, blue]).clamp(0, 1)


def read_image(path: str | os.PathLike, size: Tuple[int, int]) -> torch.Tensor:
    """An image file, centre-cropped and resized to ``size`` (height, width): (3, height, width) in [0, 1]."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.fit(image.convert("RGB"), (size[1], size[0]))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(size[0], size[1], 3).permute(2, 0, 1).float() / 255


def _first_image_file(folder: Path) -> Optional[Path]:
    """The first image file of a folder tree in sorted order, without listing the whole tree."""
    for parent, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        images = sorted(name for name in filenames if name.lower().endswith(IMAGE_EXTENSIONS))
        if images:
            return Path(parent) / images[0]
    return None


def run_config(run_dir: Optional[str | os.PathLike]) -> dict:
    """The run's ``train_config.yaml`` (VISSL writes it into the checkpoint folder), or {}."""
    import yaml

    path = Path(run_dir) / "train_config.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def dataset_image_file(config: Mapping) -> Optional[Path]:
    """The first image of the run's data: DATA.TEST/TRAIN.DATA_PATHS, else the catalog's val, then train split.

    Folders of images (VISSL's ``disk_folder``) are searched; ``None`` when nothing is on disk.
    """
    data = config.get("DATA", None) or {}
    candidates: List[str] = []
    for section in ("TEST", "TRAIN"):
        candidates += (data.get(section, None) or {}).get("DATA_PATHS", None) or []
    names = (data.get("TRAIN", None) or {}).get("DATASET_NAMES", None) or []
    catalog = read_catalog() if names else {}
    for name in names:
        for split in ("val", "train"):
            candidates += (catalog.get(name, None) or {}).get(split, [])[:1]
    for candidate in map(Path, candidates):
        if candidate.is_dir():
            found = _first_image_file(candidate)
            if found is not None:
                return found
        elif candidate.is_file() and candidate.name.lower().endswith(IMAGE_EXTENSIONS):
            return candidate
    return None


def normalisation(config: Mapping) -> MeanStd:
    """(mean, std) of the ``Normalize`` transform in the run's DATA.TRAIN.TRANSFORMS, else ImageNet's."""
    transforms = ((config.get("DATA", None) or {}).get("TRAIN", None) or {}).get("TRANSFORMS", None) or []
    for transform in transforms:
        if isinstance(transform, Mapping) and transform.get("name", None) == "Normalize":
            return transform["mean"], transform["std"]
    return IMAGENET_MEAN_STD


def normalise(image: torch.Tensor, mean_std: MeanStd = IMAGENET_MEAN_STD) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] normalised as the training transforms do: (image - mean) / std."""
    mean, std = (torch.tensor(values, dtype=image.dtype).view(3, 1, 1) for values in mean_std)
    return (image - mean) / std


# ---------------------------------------------------------------- numbers from records

def trajectories(records: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """Records as tensors: ``iterations`` (T,), ``gates`` and ``<kind>_distance`` (T, L, H)."""
    result = {"iterations": torch.tensor([r["iteration"] for r in records], dtype=torch.float64)}
    for key in ("gates",) + tuple(f"{kind}_distance" for kind in DISTANCE_KINDS):
        result[key] = torch.tensor([[layer[key] for layer in r["layers"]] for r in records], dtype=torch.float64)
    return result


def layer_rows(start_gates: torch.Tensor, end_gates: torch.Tensor) -> List[dict]:
    """Per layer: mean gate at start and end, whether it fell, heads still above 0.5 at the end (1-based)."""
    rows = []
    for index, (start, end) in enumerate(zip(start_gates, end_gates)):
        heads = [h + 1 for h, gate in enumerate(end.tolist()) if gate > CONVOLUTIONAL_GATE]
        rows.append({
            "layer": index + 1, "start": start.mean().item(), "end": end.mean().item(),
            "fell": end.mean().item() < start.mean().item() - GATE_RESOLUTION,
            "min": end.min().item(), "max": end.max().item(),
            "convolutional_heads": heads, "num_heads": end.numel(),
        })
    return rows


# ---------------------------------------------------------------- figures

def _new_figure(kind: str) -> Figure:
    return Figure(figsize=FIGURE_INCHES[kind], dpi=DPI, layout="constrained")


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
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


def _map_heads(gates: torch.Tensor, count: int = 4) -> List[int]:
    """The ``count`` // 2 heads with the highest and the lowest gates, highest first (0-based)."""
    order = torch.argsort(gates, descending=True).tolist()
    if len(order) <= count:
        return order
    return order[: count // 2] + order[-(count - count // 2):]


# ---------------------------------------------------------------- Markdown

def _gate_table(rows: Sequence[dict], start_label: str, end_label: str) -> List[str]:
    lines = [
        f"| layer | mean gate {start_label} | mean gate {end_label} | fell? | min | max | heads with gate > 0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        change = r["end"] - r["start"]
        shown = f"{change:+.3f}" if abs(change) >= GATE_RESOLUTION else "unchanged"
        fell = f"{'yes' if r['fell'] else 'no'} ({shown})"
        heads = ", ".join(map(str, r["convolutional_heads"])) or "none"
        lines.append(f"| {r['layer']} | {r['start']:.3f} | {r['end']:.3f} | {fell} | {r['min']:.3f} | {r['max']:.3f} "
                     f"| {heads} |")
    return lines


def _convolutional_lines(rows: Sequence[dict]) -> List[str]:
    kept = [r for r in rows if r["convolutional_heads"]]
    if not kept:
        return ["No layer kept a convolutional head: every head's gate is at or below 0.5."]
    listed = "; ".join(f"layer {r['layer']} (heads {', '.join(map(str, r['convolutional_heads']))} of "
                       f"{r['num_heads']}, mean gate {r['end']:.2f})" for r in kept)
    return [f"**Layers whose heads stayed convolutional (gate > 0.5):** {listed}."]


def _distance_table(start: Optional[Mapping[str, torch.Tensor]], end: Mapping[str, torch.Tensor]) -> List[str]:
    """Head-averaged distances per layer; ``start``/``end`` map ``<kind>_distance`` to (L, H)."""
    header = " | ".join(f"{kind}{' start -> end' if start is not None else ''}" for kind in DISTANCE_KINDS)
    lines = [f"| layer | {header} |", "|---|" + "---|" * len(DISTANCE_KINDS)]
    num_layers = end["mixed_distance"].shape[0]
    for layer in range(num_layers):
        cells = []
        for kind in DISTANCE_KINDS:
            value = end[f"{kind}_distance"][layer].mean().item()
            if start is not None:
                cells.append(f"{start[f'{kind}_distance'][layer].mean().item():.2f} -> {value:.2f}")
            else:
                cells.append(f"{value:.2f}")
        lines.append(f"| {layer + 1} | {' | '.join(cells)} |")
    return lines


def _health_lines(epochs: Sequence[dict], health: Sequence[dict]) -> List[str]:
    """The loss per epoch and the last health record, with every symptom the run reported."""
    if not epochs and not health:
        return [f"No `train_loss` in `{EPOCH_LOG}` and no `{HEALTH_FILE}`: enable HOOKS.CONVIT_HEALTH to record them."]
    lines = []
    if epochs:
        lines += ["| epoch | updates | training loss per sample |", "|---|---|---|"]
        lines += [f"| {r.get('train_phase_idx', '')} | {r['iteration']} | {r['train_loss']:.4f} |" for r in epochs]
    if health:
        first, last = health[0], health[-1]
        lines += ["", f"Health after {last['iteration']} updates ({last['method']}): embedding feature std "
                  f"{last['feature_std']:.4f} (spread out: {last['feature_std_healthy']:.4f}; first record "
                  f"{first['feature_std']:.4f}), effective rank {last['effective_rank']:.1f} of "
                  f"{last['embedding_dim']}; trunk features std {last['trunk_feature_std']:.4f}, effective rank "
                  f"{last['trunk_effective_rank']:.1f} of {last['trunk_dim']}"
                  + (f"; teacher entropy {last['teacher_entropy']:.3f} of at most {last['max_entropy']:.3f}"
                     if "teacher_entropy" in last else "") + "."]
        seen = list(dict.fromkeys(symptom for r in health for symptom in r.get("symptoms", [])))
        lines += ["", "**Collapse symptoms reported:** " + ("; ".join(seen) if seen else "none") + "."]
    return lines


def _run_results_lines(rows: Sequence[dict]) -> List[str]:
    if not rows:
        return []
    shown = [{**row, "file": Path(row["file"]).name} for row in rows]
    return [markdown_table(shown, [c for c in RESULT_COLUMNS if any(c in row for row in shown)]).rstrip()]


def _results_lines(rows: Sequence[dict]) -> List[str]:
    if not rows:
        return []
    lines = ["| file | entry | top1 | top5 |", "|---|---|---|---|"]
    for r in rows:
        top5 = "" if r["top5"] is None else f"{r['top5']:.2f}"
        lines.append(f"| {r['file']} | {r['entry']} | {r['top1']:.2f} | {top5} |")
    return lines


# ---------------------------------------------------------------- reports

def _record_tensors(record: dict) -> Dict[str, torch.Tensor]:
    """One record's ``gates`` and ``<kind>_distance``, each (L, H)."""
    return {key: values[0] for key, values in trajectories([record]).items() if key != "iterations"}


def _sample_image(trunk: ConViT, image_path: Optional[str], config: Mapping) -> Tuple[torch.Tensor, str]:
    """The image for attention maps, (3, H, W) in [0, 1] at the trunk's size, and where it came from."""
    size = (trunk.grid_size[0] * trunk.patch_size, trunk.grid_size[1] * trunk.patch_size)
    if image_path is not None:
        if not Path(image_path).is_file():
            raise UsageError(f"image {image_path} does not exist: pass an image file with --image")
        return read_image(image_path, size), f"`{Path(image_path).name}`"
    found = dataset_image_file(config)
    if found is not None:
        return read_image(found, size), f"`{found.name}` (from the run's dataset)"
    return synthetic_image(size), "a synthetic pattern (pass --image for a real image)"


def _trunk_gates(trunk: ConViT) -> torch.Tensor:
    """Gates of every GPSA layer of a trunk, (L, H)."""
    return torch.stack([trunk.blocks[i].attn.gate().detach() for i in range(trunk.local_up_to_layer)]).double()


def _resolve(source: Path, out_dir: Optional[str | os.PathLike]):
    """(run folder or None, checkpoint or None, records, output folder) for a report source."""
    if source.is_dir():
        checkpoint = run_checkpoint(source)
        metrics_path = source / METRICS_FILE
        records = load_gating_metrics(metrics_path) if metrics_path.is_file() else []
        if checkpoint is None and not records:
            raise UsageError(f"{source} has no checkpoint (*.torch) and no {METRICS_FILE}: pass a VISSL run folder, "
                             f"or a checkpoint file with --out")
        return source, checkpoint, records, Path(out_dir) if out_dir is not None else source / REPORT_DIR
    checkpoint = checkpoint_file(source)
    if out_dir is None:
        raise UsageError(f"{source} is a checkpoint file: pass --out DIR for the report folder")
    return None, checkpoint, [], Path(out_dir)


def write_report(source: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
                 image_path: Optional[str] = None, results: Sequence[str | os.PathLike] = ()) -> Path:
    """Figures and ``summary.md`` for a run folder or a checkpoint file; returns the summary's path.

    ``out_dir`` defaults to ``<run>/report`` for a run folder and is required for a checkpoint file.
    Gates at the start and end come from the first and last records of ``gating_metrics.jsonl``;
    without records (a bare checkpoint), from the init value 0.731 and the checkpoint. The heatmap shows
    the checkpoint's gates when there is one, else the last record's. For a run folder, the training loss and
    health are plotted and the evaluation results of its checkpoints listed, searched in ``result_folders``
    (``results``: more folders).
    """
    source = Path(source)
    run_dir, checkpoint, records, out_dir = _resolve(source, out_dir)
    trunk, load_report = load_trunk(checkpoint) if checkpoint is not None else (None, None)
    if trunk is not None and trunk.local_up_to_layer == 0:
        raise UsageError(f"{checkpoint} holds a trunk without GPSA layers (a DeiT): there are no gates to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = source.name if run_dir is not None else source.stem

    lines = [f"# What the gates learned: {name}", ""]
    if checkpoint is not None:
        lines.append(f"Checkpoint: `{checkpoint.name}` ({load_report.source_format} format, arch {load_report.arch}, "
                     f"{trunk.local_up_to_layer} GPSA layers of {trunk.depth}, {trunk.num_heads} heads).")
    figures: List[Tuple[str, Path]] = []
    if records:
        first, last = records[0], records[-1]
        start, end = _record_tensors(first), _record_tensors(last)
        start_label, end_label = f"at iteration {first['iteration']}", f"at iteration {last['iteration']}"
        lines.append(f"Gating metrics: {len(records)} records of `{METRICS_FILE}`, iterations {first['iteration']} "
                     f"to {last['iteration']} (epochs {first['epoch']} to {last['epoch']}), on a probe batch of "
                     f"{last['probe_images']} training images.")
        distance_note = "on the probe batch, start -> end of training"
        figures.append(("Gate of every head over training (black: head mean)",
                        plot_gate_trajectories({name: records}, out_dir / "gate_trajectories.png")))
        figures.append(("Mean attention distance per layer over training",
                        plot_attention_distances({name: records}, out_dir / "attention_distance.png")))
    else:
        lines.append(f"No `{METRICS_FILE}` in the run folder: enable HOOKS.CONVIT_GATING to record trajectories."
                     if run_dir is not None else "A bare checkpoint has no trajectories; the start is the init value.")

    if trunk is not None:
        final_gates, heatmap_title = _trunk_gates(trunk), f"gates of {checkpoint.name}"
        config = run_config(run_dir)
        image, image_note = _sample_image(trunk, image_path, config)
        normalised = normalise(image, normalisation(config))
        if not records:
            start, end = None, gating_diagnostics(trunk, normalised)
            start_label, end_label = "at init", "in the checkpoint"
            distance_note = f"on the sample image, {image_note}"
        for block in sorted({0, trunk.local_up_to_layer - 1}):
            maps = attention_maps(trunk, normalised, blocks=[block], heads=_map_heads(final_gates[block]))
            path = plot_attention_maps(maps, image, 0, out_dir / f"attention_maps_layer{block + 1}.png")
            figures.append((f"Where the centre patch attends, layer {block + 1}, on {image_note}", path))
    else:
        final_gates, heatmap_title = end["gates"], f"gates at iteration {records[-1]['iteration']}"
        lines.append("No checkpoint in the run folder: no attention maps.")
    figures.insert(0, ("Final gates (layers x heads)",
                       plot_gate_heatmap(final_gates, out_dir / "gates_final.png", heatmap_title)))

    rows = layer_rows(start["gates"] if start is not None else torch.full_like(end["gates"], INITIAL_GATE),
                      end["gates"])
    lines += ["", "## Gates per layer", "",
              "The gate g = sigmoid(gating) is a head's weight on positional attention: 1 = a convolution-like "
              "local filter, 0 = plain content attention. Every gate starts at sigmoid(1) = 0.731.", ""]
    lines += _gate_table(rows, start_label, end_label)
    lines += ["", *_convolutional_lines(rows), "", PAPER_FINDING]
    lines += ["", "## Mean attention distance (patches)", "",
              f"Head-averaged sum_j A_ij ||r_ij||, averaged over queries, {distance_note}.", ""]
    lines += _distance_table(start, end)
    if run_dir is not None:
        epochs = load_epoch_losses(run_dir)
        health_path = run_dir / HEALTH_FILE
        health = load_gating_metrics(health_path, "health record") if health_path.is_file() else []
        lines += ["", "## Training loss and health", "", *_health_lines(epochs, health)]
        if epochs or health:
            figures.append(("Training loss, feature std and effective rank over training",
                            plot_training_health(epochs, health, out_dir / "training_health.png")))
        folders = result_folders(run_dir, results)
        found = _run_results_lines(run_results(run_dir, folders)) + _results_lines(find_results(run_dir))
        searched = ", ".join(f"`{folder}`" for folder in folders)
        lines += ["", "## Evaluation results", "",
                  *(found or [f"No evaluation results of this run's checkpoints in {searched}: run "
                              f"`convit-ssl linear-probe --checkpoint {run_dir}` or `convit-ssl knn`, or pass "
                              f"--results DIR."])]
    lines += ["", "## Figures", ""]
    for caption, path in figures:
        lines += [f"![{caption}]({path.name})", "", caption, ""]
    summary = out_dir / SUMMARY_FILE
    summary.write_text("\n".join(lines).rstrip() + "\n")
    return summary


def write_comparison(run_a: str | os.PathLike, run_b: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Gate trajectories and attention distances of two runs overlaid, and a summary; returns its path."""
    runs: Dict[str, List[dict]] = {}
    for letter, run in (("A", Path(run_a)), ("B", Path(run_b))):
        metrics_path = run / METRICS_FILE
        if not metrics_path.is_file():
            raise UsageError(f"run {letter} ({run}) has no {METRICS_FILE}: pass a run folder trained with "
                             f"HOOKS.CONVIT_GATING.ENABLE=True")
        records = load_gating_metrics(metrics_path)
        if not records:
            raise UsageError(f"run {letter} ({run}) has an empty {METRICS_FILE}: it has not reached its first record")
        runs[f"{letter}: {run.name}"] = records
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gates_path = plot_gate_trajectories(runs, out_dir / "compare_gates.png")
    distance_path = plot_attention_distances(runs, out_dir / "compare_attention_distance.png")

    labels = list(runs)
    lines = [f"# Gates compared: {labels[0]} (solid) vs {labels[1]} (dashed)", ""]
    ends = {}
    for label, records in runs.items():
        start, end = _record_tensors(records[0]), _record_tensors(records[-1])
        ends[label] = end
        rows = layer_rows(start["gates"], end["gates"])
        lines += [f"## {label}", "", f"{len(records)} records, iterations {records[0]['iteration']} to "
                  f"{records[-1]['iteration']}.", ""]
        lines += _gate_table(rows, f"at iteration {records[0]['iteration']}",
                             f"at iteration {records[-1]['iteration']}")
        lines += [""] + _convolutional_lines(rows) + [""]
    lines += ["## Final mean gate and mixed attention distance per layer", "",
              f"| layer | gate {labels[0]} | gate {labels[1]} | distance {labels[0]} | distance {labels[1]} |",
              "|---|---|---|---|---|"]
    num_layers = max(end["gates"].shape[0] for end in ends.values())
    for layer in range(num_layers):
        cells = []
        for key in ("gates", "mixed_distance"):
            for label in labels:
                values = ends[label][key]
                cells.append(f"{values[layer].mean().item():.3f}" if layer < values.shape[0] else "-")
        lines.append(f"| {layer + 1} | {' | '.join(cells)} |")
    lines += ["", PAPER_FINDING, "", "## Figures", "",
              f"![gates over training]({gates_path.name})", "",
              f"![attention distance over training]({distance_path.name})"]
    summary = out_dir / SUMMARY_FILE
    summary.write_text("\n".join(lines) + "\n")
    return summary
