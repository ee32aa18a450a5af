"""Figures and a Markdown summary of what the gates learned, for a run folder, a checkpoint or two runs.

A run folder is a VISSL checkpoint folder: checkpoints (``checkpoint.torch``, ``model_phase*.torch``,
``model_final_checkpoint_phase*.torch``), ``gating_metrics.jsonl`` written by
``convit_ssl.gating_hook.GatingDiagnosticsHook``, ``train_config.yaml``, the training logs, and the
convit-ssl result files (``convit_ssl.evaluation.results``) of its checkpoints. A report is made in two
steps: ``collect_report`` reads the run and computes every number (gates and distances with
``convit_ssl.diagnostics``, results with ``results.gather``) into a ``RunReport``; ``render_report``
draws it, into ``<run>/report``:

* ``gates_final.png``: the final gates, layers x heads;
* ``gate_trajectories.png``: every head's gate over training, one panel per layer (needs the metrics);
* ``attention_distance.png``: mean attention distance per layer over training (needs the metrics);
* ``attention_maps_layer<n>.png``: positional, content and mixed attention of the centre patch for
  four heads (the two highest and the two lowest gates) of the first and last GPSA layer, on one image
  (``--image``, else the first image of the run's dataset, val split first, normalised as in training,
  else a fixed synthetic pattern);
* ``summary.md``: per layer the mean gate at the start and the end, whether it fell, which layers kept
  convolutional heads (gate > 0.5), attention distances, evaluation results.

``write_report`` does both; the figures are drawn by ``convit_ssl.report_figures``. Layers and heads are
numbered from 1 in figures and text, as in the paper; JSON records keep the 0-based block index.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from convit_ssl import atomic
from convit_ssl.checkpoint import LoadReport, checkpoint_file, load_trunk
from convit_ssl.data import read_catalog
from convit_ssl.diagnostics import (CONVOLUTIONAL_GATE, DISTANCE_KINDS, INITIAL_GATE, attention_maps,
                                    diagnostics_from_record, gating_diagnostics)
from convit_ssl.errors import UsageError
from convit_ssl.evaluation.features import imagenet_statistics
from convit_ssl.evaluation.results import file_sha256, gather, markdown_table, read_result
from convit_ssl.health import symptom_lines
from convit_ssl.images import DATASET_IMAGE_FIX, IMAGE_EXTENSIONS, read_image
from convit_ssl.models.convit import ConViT
from convit_ssl.report_figures import (plot_attention_distances, plot_attention_maps, plot_gate_heatmap,
                                       plot_gate_trajectories, plot_training_health)
from convit_ssl.run_folder import EPOCH_LOG, HEALTH_FILE, METRICS_FILE, recorded_config, run_checkpoint

REPORT_DIR = "report"
SUMMARY_FILE = "summary.md"
DEFAULT_RESULTS_DIR = Path("runs") / "eval"  # linear-probe's and knn's default --out
RESULT_COLUMNS = ["kind", "model", "dataset", "fraction", "feature", "k", "top1", "top5", "file"]
GATE_RESOLUTION = 0.0005  # mean-gate changes below the summary's three decimals count as no change
MeanStd = Tuple[Sequence[float], Sequence[float]]
PAPER_FINDING = (
    "Paper (ConViT-S, supervised ImageNet training): the head-averaged gate falls from 0.73 in every GPSA "
    "layer, to about 0 in layers 6-10, while layers 1-5 keep some heads with a high gate (layer 4: 0.82, "
    "0.82, 0.84, 0.75, 0.34, 0.14, 0.03, 0, 0)."
)


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


def result_folders(run_dir: str | os.PathLike, extra: Sequence[str | os.PathLike] = ()) -> List[Path]:
    """Where a run's evaluation results may be: the run folder, ``eval`` beside it (``runs/eval`` for
    ``runs/NAME``), ``runs/eval`` of the working folder (the default ``--out`` of linear-probe and knn), and
    ``extra``; existing folders only, and none inside another (searched with it: its results would count twice)."""
    run_dir = Path(run_dir)
    candidates = [run_dir, run_dir.parent / "eval", DEFAULT_RESULTS_DIR, *map(Path, extra)]
    folders: List[Path] = []
    for folder in candidates:
        if not folder.is_dir():
            continue
        resolved = folder.resolve()
        if any(kept == resolved or kept in resolved.parents for kept in (f.resolve() for f in folders)):
            continue
        folders = [f for f in folders if resolved not in f.resolve().parents] + [folder]
    return folders


def run_results(run_dir: str | os.PathLike, folders: Sequence[str | os.PathLike]) -> List[dict]:
    """Rows of the convit-ssl result files under ``folders`` whose manifest names a checkpoint file of this run
    (a model whose ``file`` lies in ``run_dir`` and, when the manifest holds its ``sha256`` and the file is there,
    still has that content: a folder trained again writes other weights under the same names), each row with its
    ``file``."""
    run_dir = Path(run_dir).resolve()
    digests: Dict[Path, str] = {}

    def of_this_run(model: Mapping) -> bool:
        file = Path(model["file"]) if model.get("file") else None
        if file is None or file.parent != run_dir:
            return False
        if not model.get("sha256") or not file.is_file():
            return True
        if file not in digests:
            digests[file] = file_sha256(file)
        return digests[file] == model["sha256"]

    rows = []
    for row in gather(folders):
        result = read_result(row["file"])
        if any(of_this_run(model) for model in (result.get("manifest") or {}).get("models", [])):
            rows.append(row)
    return rows


def load_epoch_losses(run_dir: str | os.PathLike) -> List[dict]:
    """``metrics.json`` lines that hold a ``train_loss`` (written by ``convit_ssl.health_hook``), in order, of the
    run that started last in the folder: a line whose ``iteration`` is not past the previous one's begins a run
    that started over (VISSL appends to the file; only a resume cuts it back), and the lines before it go."""
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
            if lines and record["iteration"] <= lines[-1]["iteration"]:
                lines = []
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


def fitted_image(path: str | os.PathLike, size: Tuple[int, int], fix: str = DATASET_IMAGE_FIX) -> torch.Tensor:
    """An image file (read by ``convit_ssl.images.read_image``: one line naming it and ``fix`` when unreadable),
    centre-cropped and resized to ``size`` (height, width): (3, height, width) in [0, 1]."""
    from PIL import ImageOps

    image = ImageOps.fit(read_image(path, fix), (size[1], size[0]))
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
    """The run's recorded ``train_config.yaml`` (``run_folder.recorded_config``), or {}."""
    return (recorded_config(run_dir) if run_dir is not None else None) or {}


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
    return imagenet_statistics()


def normalise(image: torch.Tensor, mean_std: Optional[MeanStd] = None) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] normalised as the training transforms do: (image - mean) / std (ImageNet's
    when ``mean_std`` is None)."""
    mean, std = (torch.tensor(values, dtype=image.dtype).view(3, 1, 1) for values in mean_std or imagenet_statistics())
    return (image - mean) / std

# ---------------------------------------------------------------- numbers

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


def _map_heads(gates: torch.Tensor, count: int = 4) -> List[int]:
    """The ``count`` // 2 heads with the highest and the lowest gates, highest first (0-based)."""
    order = torch.argsort(gates, descending=True).tolist()
    if len(order) <= count:
        return order
    return order[: count // 2] + order[-(count - count // 2):]


@dataclass
class GateChange:
    """Gates and attention distances at the start and the end of training, each a ``gating_diagnostics`` dict.

    ``start`` is None when only the end is known (a bare checkpoint): every gate starts at ``INITIAL_GATE``
    and the start distances are unknown. ``rows``: ``layer_rows`` of the two.
    """

    start: Optional[Mapping[str, object]]
    end: Mapping[str, object]
    start_label: str
    end_label: str
    distance_note: str  # where the distances were measured
    rows: List[dict] = field(init=False)

    def __post_init__(self):
        end_gates = self.end["gates"]
        start_gates = self.start["gates"] if self.start is not None else torch.full_like(end_gates, INITIAL_GATE)
        self.rows = layer_rows(start_gates, end_gates)

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "GateChange":
        """From the first and the last gating record of a run."""
        first, last = records[0], records[-1]
        return cls(diagnostics_from_record(first), diagnostics_from_record(last), f"at iteration {first['iteration']}",
                   f"at iteration {last['iteration']}", "on the probe batch, start -> end of training")


@dataclass
class RunReport:
    """Everything a report shows, read and computed, before anything is drawn.

    ``final_gates`` (L, H): the checkpoint's (``gating_diagnostics``) when there is one, else the last record's.
    ``attention_maps``: one ``diagnostics.attention_maps`` result per drawn GPSA layer (first and last), on
    ``image`` (3, H, W) in [0, 1]. ``epochs``, ``health``, ``results`` and ``result_folders`` are for a run
    folder only (None for a checkpoint file).
    """

    name: str
    run_dir: Optional[Path]
    checkpoint: Optional[Path]
    load_report: Optional[LoadReport]
    trunk: Optional[ConViT]
    records: List[dict]
    gates: GateChange
    final_gates: torch.Tensor
    heatmap_title: str
    image: Optional[torch.Tensor] = None
    image_note: str = ""
    attention_maps: List[dict] = field(default_factory=list)
    epochs: Optional[List[dict]] = None
    health: Optional[List[dict]] = None
    results: Optional[List[dict]] = None
    result_folders: Optional[List[Path]] = None


def _sample_image(trunk: ConViT, image_path: Optional[str], config: Mapping) -> Tuple[torch.Tensor, str]:
    """The image for attention maps, (3, H, W) in [0, 1] at the trunk's size, and where it came from."""
    size = (trunk.grid_size[0] * trunk.patch_size, trunk.grid_size[1] * trunk.patch_size)
    if image_path is not None:
        return fitted_image(image_path, size, fix="pass an image file PIL can read with --image"), \
            f"`{Path(image_path).name}`"
    found = dataset_image_file(config)
    if found is not None:
        return fitted_image(found, size), f"`{found.name}` (from the run's dataset)"
    return synthetic_image(size), "a synthetic pattern (pass --image for a real image)"


def _resolve(source: Path) -> Tuple[Optional[Path], Optional[Path], List[dict]]:
    """(run folder or None, checkpoint or None, gating records) of a report source."""
    if source.is_dir():
        checkpoint = run_checkpoint(source)
        metrics_path = source / METRICS_FILE
        records = load_gating_metrics(metrics_path) if metrics_path.is_file() else []
        if checkpoint is None and not records:
            raise UsageError(f"{source} has no checkpoint (*.torch) and no {METRICS_FILE}: pass a VISSL run folder, "
                             f"or a checkpoint file with --out")
        return source, checkpoint, records
    return None, checkpoint_file(source), []


def collect_report(source: str | os.PathLike, image_path: Optional[str] = None,
                   results: Sequence[str | os.PathLike] = ()) -> RunReport:
    """Read a run folder or a checkpoint file and compute what its report shows (see ``write_report``)."""
    source = Path(source)
    run_dir, checkpoint, records = _resolve(source)
    trunk, load_report = load_trunk(checkpoint) if checkpoint is not None else (None, None)
    if trunk is not None and trunk.local_up_to_layer == 0:
        raise UsageError(f"{checkpoint} holds a trunk without GPSA layers (a DeiT): there are no gates to report")
    collected = {}
    if trunk is not None:
        config = run_config(run_dir)
        image, image_note = _sample_image(trunk, image_path, config)
        normalised = normalise(image, normalisation(config))
        in_checkpoint = gating_diagnostics(trunk, normalised)
        final_gates = in_checkpoint["gates"]
        blocks = in_checkpoint["blocks"]
        maps = [attention_maps(trunk, normalised, blocks=[blocks[row]], heads=_map_heads(final_gates[row]))
                for row in sorted({0, len(blocks) - 1})]
        gates = (GateChange.from_records(records) if records else
                 GateChange(None, in_checkpoint, "at init", "in the checkpoint", f"on the sample image, {image_note}"))
        collected.update(final_gates=final_gates, heatmap_title=f"gates of {checkpoint.name}", image=image,
                         image_note=image_note, attention_maps=maps)
    else:
        gates = GateChange.from_records(records)
        collected.update(final_gates=gates.end["gates"], heatmap_title=f"gates at iteration {records[-1]['iteration']}")
    if run_dir is not None:
        health_path = run_dir / HEALTH_FILE
        folders = result_folders(run_dir, results)
        collected.update(
            epochs=load_epoch_losses(run_dir),
            health=load_gating_metrics(health_path, "health record") if health_path.is_file() else [],
            results=run_results(run_dir, folders), result_folders=folders)
    return RunReport(name=source.name if run_dir is not None else source.stem, run_dir=run_dir,
                     checkpoint=checkpoint, load_report=load_report, trunk=trunk, records=records, gates=gates,
                     **collected)


def collect_comparison(run_a: str | os.PathLike, run_b: str | os.PathLike) -> Dict[str, List[dict]]:
    """The gating records of two run folders, labelled ``A: <name>`` and ``B: <name>``."""
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
    return runs


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
        seen = symptom_lines(health)
        lines += ["", "**Collapse symptoms reported:** " + ("; ".join(seen) if seen else "none") + "."]
    return lines


def _run_results_lines(rows: Sequence[dict]) -> List[str]:
    if not rows:
        return []
    shown = [{**row, "file": Path(row["file"]).name} for row in rows]
    return [markdown_table(shown, [c for c in RESULT_COLUMNS if any(c in row for row in shown)]).rstrip()]


# ---------------------------------------------------------------- rendering

def _figures(report: RunReport, out_dir: Path) -> List[Tuple[str, Path]]:
    """Draw the report's figures into ``out_dir``: (caption, path) of each, in the summary's order."""
    figures = [("Final gates (layers x heads)",
                plot_gate_heatmap(report.final_gates, out_dir / "gates_final.png", report.heatmap_title))]
    if report.records:
        figures.append(("Gate of every head over training (black: head mean)",
                        plot_gate_trajectories({report.name: report.records}, out_dir / "gate_trajectories.png")))
        figures.append(("Mean attention distance per layer over training",
                        plot_attention_distances({report.name: report.records}, out_dir / "attention_distance.png")))
    for maps in report.attention_maps:
        layer = maps["blocks"][0] + 1
        path = plot_attention_maps(maps, report.image, 0, out_dir / f"attention_maps_layer{layer}.png")
        figures.append((f"Where the centre patch attends, layer {layer}, on {report.image_note}", path))
    if report.epochs or report.health:
        figures.append(("Training loss, feature std and effective rank over training",
                        plot_training_health(report.epochs, report.health, out_dir / "training_health.png")))
    return figures


def summary_lines(report: RunReport, figures: Sequence[Tuple[str, Path]]) -> List[str]:
    """The Markdown summary of a collected report, as lines; ``figures``: (caption, path) to show."""
    trunk, gates, records = report.trunk, report.gates, report.records
    lines = [f"# What the gates learned: {report.name}", ""]
    if report.checkpoint is not None:
        lines.append(f"Checkpoint: `{report.checkpoint.name}` ({report.load_report.source_format} format, arch "
                     f"{report.load_report.arch}, {trunk.local_up_to_layer} GPSA layers of {trunk.depth}, "
                     f"{trunk.num_heads} heads).")
    if records:
        first, last = records[0], records[-1]
        lines.append(f"Gating metrics: {len(records)} records of `{METRICS_FILE}`, iterations {first['iteration']} "
                     f"to {last['iteration']} (epochs {first['epoch']} to {last['epoch']}), on a probe batch of "
                     f"{last['probe_images']} training images.")
    else:
        lines.append(f"No `{METRICS_FILE}` in the run folder: enable HOOKS.CONVIT_GATING to record trajectories."
                     if report.run_dir is not None else
                     "A bare checkpoint has no trajectories; the start is the init value.")
    if trunk is None:
        lines.append("No checkpoint in the run folder: no attention maps.")
    lines += ["", "## Gates per layer", "",
              "The gate g = sigmoid(gating) is a head's weight on positional attention: 1 = a convolution-like "
              "local filter, 0 = plain content attention. Every gate starts at sigmoid(1) = 0.731.", ""]
    lines += _gate_table(gates.rows, gates.start_label, gates.end_label)
    lines += ["", *_convolutional_lines(gates.rows), "", PAPER_FINDING]
    lines += ["", "## Mean attention distance (patches)", "",
              f"Head-averaged sum_j A_ij ||r_ij||, averaged over queries, {gates.distance_note}.", ""]
    lines += _distance_table(gates.start, gates.end)
    if report.run_dir is not None:
        lines += ["", "## Training loss and health", "", *_health_lines(report.epochs, report.health)]
        searched = ", ".join(f"`{folder}`" for folder in report.result_folders)
        lines += ["", "## Evaluation results", "",
                  *(_run_results_lines(report.results) or
                    [f"No evaluation results of this run's checkpoints in {searched}: run "
                     f"`convit-ssl linear-probe --checkpoint {report.run_dir}` or `convit-ssl knn`, or pass "
                     f"--results DIR."])]
    lines += ["", "## Figures", ""]
    for caption, path in figures:
        lines += [f"![{caption}]({path.name})", "", caption, ""]
    return lines


def render_report(report: RunReport, out_dir: str | os.PathLike) -> Path:
    """Figures and ``summary.md`` of a collected report in ``out_dir``; returns the summary's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / SUMMARY_FILE
    atomic.write_text("\n".join(summary_lines(report, _figures(report, out_dir))).rstrip() + "\n", summary)
    return summary


def render_comparison(runs: Mapping[str, Sequence[dict]], out_dir: str | os.PathLike) -> Path:
    """Gate trajectories and attention distances of two runs' records overlaid, and a summary; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gates_path = plot_gate_trajectories(runs, out_dir / "compare_gates.png")
    distance_path = plot_attention_distances(runs, out_dir / "compare_attention_distance.png")
    labels = list(runs)
    lines = [f"# Gates compared: {labels[0]} (solid) vs {labels[1]} (dashed)", ""]
    ends = {}
    for label, records in runs.items():
        change = GateChange.from_records(records)
        ends[label] = change.end
        lines += [f"## {label}", "", f"{len(records)} records, iterations {records[0]['iteration']} to "
                  f"{records[-1]['iteration']}.", ""]
        lines += _gate_table(change.rows, change.start_label, change.end_label)
        lines += [""] + _convolutional_lines(change.rows) + [""]
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
    atomic.write_text("\n".join(lines) + "\n", summary)
    return summary


# ---------------------------------------------------------------- reports

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
    if out_dir is None and not source.is_dir():
        raise UsageError(f"{checkpoint_file(source)} is a checkpoint file: pass --out DIR for the report folder")
    report = collect_report(source, image_path, results)
    return render_report(report, out_dir if out_dir is not None else source / REPORT_DIR)


def write_comparison(run_a: str | os.PathLike, run_b: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Gate trajectories and attention distances of two runs overlaid, and a summary; returns its path."""
    return render_comparison(collect_comparison(run_a, run_b), out_dir)
