"""`convit-ssl report` on fake run folders and checkpoints: numbers in the summary, valid figures."""
import contextlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from convit_ssl import report, report_figures
from convit_ssl.checkpoint import to_timm_state_dict
from convit_ssl.cli import main
from convit_ssl.diagnostics import diagnostics_record, gating_diagnostics
from convit_ssl.evaluation.results import write_result
from convit_ssl.run_folder import run_checkpoint

INIT = 1 / (1 + math.exp(-1))


def logit(p):
    return math.log(p / (1 - p))


def assert_png(path, kind):
    width, height = (round(side * report_figures.DPI) for side in report_figures.FIGURE_INCHES[kind])
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (width, height)
        image.verify()


def set_gates(trunk, gates):
    with torch.no_grad():
        for block, row in zip(trunk.blocks, gates):
            block.attn.gating.copy_(torch.tensor([logit(g) for g in row]))


# Layer 1 keeps heads 1-3 convolutional; layer 2's gates all fall below 0.5.
FINAL_GATES = [[0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02], [0.3] * 9]


def make_run(folder, trunk, images, final_gates=FINAL_GATES, iterations=(0, 50, 100)):
    """A VISSL-like run folder: gating records from init to ``final_gates``, a checkpoint, a result file."""
    folder.mkdir(parents=True)
    with open(folder / "gating_metrics.jsonl", "w") as stream:
        for step, iteration in enumerate(iterations):
            share = step / (len(iterations) - 1)
            set_gates(trunk, [[INIT + share * (g - INIT) for g in row] for row in final_gates])
            record = {"iteration": iteration, "epoch": step, "probe_images": 4,
                      **diagnostics_record(gating_diagnostics(trunk, images))}
            stream.write(json.dumps(record) + "\n")
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk.state_dict()}}}},
               folder / "model_final_checkpoint_phase2.torch")
    (folder / "eval").mkdir()
    checkpoint = folder / "model_final_checkpoint_phase2.torch"
    write_result({"kind": "linear", "manifest": {"models": [{"file": str(checkpoint.resolve())}]},
                  "rows": [{"kind": "linear", "model": "run", "dataset": "digits_val", "top1": 61.25, "top5": 88.5}]},
                 folder / "eval" / "linear_probe.json")
    (folder / "eval" / "knn.json").write_text(json.dumps({"k20": {"top1": 55.5}, "notes": "x"}))  # no provenance
    return folder


def summary_row(text, layer):
    return next(line for line in text.splitlines() if line.startswith(f"| {layer} |"))


def test_run_folder_report(trunk, images, tmp_path):
    run = make_run(tmp_path / "run", trunk, images)
    assert main(["report", str(run)]) == 0
    out = run / "report"
    for kind in ("gates_final", "gate_trajectories", "attention_distance"):
        assert_png(out / f"{kind}.png", kind)
    for layer in (1, 2):
        assert_png(out / f"attention_maps_layer{layer}.png", "attention_maps")
    text = (out / "summary.md").read_text()
    layer1 = summary_row(text, 1).split(" | ")
    mean_end = sum(FINAL_GATES[0]) / 9
    assert layer1[1:4] == [f"{INIT:.3f}", f"{mean_end:.3f}", f"yes ({mean_end - INIT:+.3f})"]
    assert layer1[-1] == "1, 2, 3 |"
    assert summary_row(text, 2).endswith("| none |")
    assert "**Layers whose heads stayed convolutional (gate > 0.5):** layer 1 (heads 1, 2, 3 of 9" in text
    assert "layer 2 (" not in text
    assert "iterations 0 to 100" in text
    assert "| linear | run | digits_val | 61.25 | 88.50 | linear_probe.json |" in text
    assert "55.50" not in text and "knn.json" not in text  # a JSON file that is not a result file is not read
    for name in ("gates_final.png", "gate_trajectories.png", "attention_maps_layer2.png"):
        assert f"]({name})" in text


def test_gate_table_says_fell_rose_or_unchanged():
    start = torch.full((3, 2), INIT)
    end = torch.tensor([[0.9, 0.2], [INIT + 1e-4, INIT], [0.8, 0.9]])
    rows = report.layer_rows(start, end)
    assert [r["fell"] for r in rows] == [True, False, False]
    assert [r["convolutional_heads"] for r in rows] == [[1], [1, 2], [1, 2]]
    table = report._gate_table(rows, "at init", "at the end")
    assert table[2].split(" | ")[3] == f"yes ({0.55 - INIT:+.3f})"
    assert table[3].split(" | ")[3] == "no (unchanged)"
    assert table[4].split(" | ")[3] == f"no ({0.85 - INIT:+.3f})"


def test_checkpoint_discovery_and_metrics_reading(tmp_path):
    for name in ("model_phase9.torch", "model_phase10.torch", "model_final_checkpoint_phase3.torch"):
        (tmp_path / name).write_bytes(b"")
    assert run_checkpoint(tmp_path).name == "model_final_checkpoint_phase3.torch"
    (tmp_path / "model_final_checkpoint_phase3.torch").unlink()
    assert run_checkpoint(tmp_path).name == "model_phase10.torch"
    os.symlink("model_phase9.torch", tmp_path / "checkpoint.torch")
    assert run_checkpoint(tmp_path).name == "checkpoint.torch"

    metrics = tmp_path / "gating_metrics.jsonl"
    lines = [{"iteration": i, "tag": tag, "layers": []} for i, tag in [(0, "a"), (10, "a"), (20, "a"), (10, "resumed")]]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"iteration": 30, "lay')
    records = report.load_gating_metrics(metrics)  # a resume rewrites iteration 10; the cut last line is dropped
    assert [(r["iteration"], r["tag"]) for r in records] == [(0, "a"), (10, "resumed"), (20, "a")]
    metrics.write_text('{"iteration": 0}\nnot json\n{"iteration": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        report.load_gating_metrics(metrics)


@pytest.mark.parametrize("layout, format_name", [("vissl", "vissl"),
                                                 pytest.param("timm", "state_dict", marks=pytest.mark.slow)])
def test_bare_checkpoint_report(make_trunk, layout, format_name, tmp_path):
    trunk = make_trunk()
    set_gates(trunk, FINAL_GATES)
    checkpoint = tmp_path / "weights.torch"
    state = trunk.state_dict() if layout == "vissl" else to_timm_state_dict(trunk)
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": state}}}} if layout == "vissl" else state,
               checkpoint)
    assert main(["report", str(checkpoint)]) == 2  # needs --out
    out = tmp_path / "out"
    assert main(["report", str(checkpoint), "--out", str(out)]) == 0
    assert_png(out / "gates_final.png", "gates_final")
    assert_png(out / "attention_maps_layer1.png", "attention_maps")
    assert not (out / "gate_trajectories.png").exists()
    text = (out / "summary.md").read_text()
    assert f"({format_name} format" in text and "no trajectories" in text
    assert summary_row(text, 2).split(" | ")[1:4] == [f"{INIT:.3f}", "0.300", f"yes ({0.3 - INIT:+.3f})"]
    # Distances measured on the sample image: positional ones are exact and image-independent.
    expected = gating_diagnostics(trunk, torch.zeros(1, 3, 32, 32))["positional_distance"][0].mean().item()
    assert summary_row(text.split("## Mean attention distance")[1], 1).split(" | ")[1] == f"{expected:.2f}"


@pytest.mark.slow
def test_compare_two_runs(make_trunk, images, tmp_path):
    run_a = make_run(tmp_path / "convit", make_trunk(), images)
    run_b = make_run(tmp_path / "other", make_trunk(), images, final_gates=[[0.7] * 9, [0.1] * 9],
                     iterations=(0, 40, 80, 120))
    out = tmp_path / "cmp"
    assert main(["report", "--compare", str(run_a), str(run_b)]) == 2  # needs --out
    assert main(["report", "--compare", str(run_a), str(run_b), "--out", str(out)]) == 0
    assert_png(out / "compare_gates.png", "gate_trajectories")
    assert_png(out / "compare_attention_distance.png", "attention_distance")
    text = (out / "summary.md").read_text()
    final = summary_row(text.split("## Final mean gate")[1], 2).split(" | ")
    assert final[1:3] == ["0.300", "0.100"]
    assert "iterations 0 to 120" in text and "A: convit" in text and "B: other" in text
    (run_b / "gating_metrics.jsonl").unlink()
    assert main(["report", "--compare", str(run_a), str(run_b), "--out", str(out)]) == 2


@pytest.mark.slow
def test_attention_maps_use_an_image_of_the_runs_dataset(trunk, images, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", trunk, images)
    val = tmp_path / "data" / "digits" / "val" / "class_b"
    val.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(val / "img_001.png")
    monkeypatch.setenv("CONVIT_SSL_DATA", str(tmp_path / "data"))
    catalog = {"digits": {"train": [str(tmp_path / "missing")] * 2, "val": [str(val.parent)] * 2}}
    (tmp_path / "data" / "dataset_catalog.json").write_text(json.dumps(catalog))
    (run / "train_config.yaml").write_text(
        "DATA:\n  TRAIN:\n    DATA_PATHS: []\n    DATASET_NAMES: [digits]\n"
        "    TRANSFORMS:\n    - {name: ToTensor}\n"
        "    - {name: Normalize, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}\n")
    config = report.run_config(run)
    assert report.dataset_image_file(config) == val / "img_001.png"
    assert report.normalisation(config) == ([0.5] * 3, [0.5] * 3)
    image = report.fitted_image(val / "img_001.png", (32, 32))
    torch.testing.assert_close(image[:, 5, 5], torch.tensor([200, 30, 30]) / 255)
    torch.testing.assert_close(report.normalise(image, report.normalisation(config))[:, 5, 5],
                               torch.tensor([200, 30, 30]) / 127.5 - 1)
    summary = report.write_report(run)
    assert "`img_001.png` (from the run's dataset)" in summary.read_text()


def test_usage_errors(tmp_path, capsys):
    assert main(["report"]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 2  # a folder with neither checkpoint nor metrics
    (tmp_path / "model.torch").write_bytes(b"")
    assert main(["report", str(tmp_path / "model.torch"), "--results", str(tmp_path)]) == 2
    assert "--results lists the evaluations of a run folder's checkpoints" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--results", str(tmp_path / "missing")]) == 2
    assert "is not a folder: pass folders of linear-probe/knn results" in capsys.readouterr().err
    assert main(["report", "--compare", str(tmp_path), str(tmp_path), "--out", "x", "--results", str(tmp_path)]) == 2
    assert "--image and --results are for the report of one run" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [(b"not a png", "cannot read image {}"), (None, "image {} does not exist")],
                         ids=["unreadable", "missing"])
def test_an_image_that_cannot_be_read_is_named_in_one_line(trunk, images, tmp_path, capsys, content, problem):
    run = make_run(tmp_path / "run", trunk, images)
    broken = tmp_path / "broken.png"
    if content is not None:
        broken.write_bytes(content)
    assert main(["report", str(run), "--image", str(broken)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and problem.format(broken) in error[0], error
    assert "pass an image file PIL can read with --image" in error[0], error


def test_run_report_shows_training_health_and_the_runs_results_in_runs_eval(trunk, images, tmp_path):
    run = make_run(tmp_path / "runs" / "run", trunk, images)
    (run / "metrics.json").write_text(
        json.dumps({"iteration": 22, "phase_idx": 0, "train_phase_idx": 0, "train_loss": 4.5, "train_loss_steps": 22})
        + "\n" + json.dumps({"iteration": 44, "phase_idx": 1, "train_phase_idx": 1, "train_loss": 3.25,
                              "train_loss_steps": 22}) + "\n")
    health = [{"iteration": i, "epoch": i // 22, "method": "barlow_twins_loss", "loss": loss, "loss_steps": 20,
               "feature_std": std, "feature_std_healthy": 0.0625, "effective_rank": rank, "embedding_dim": 256,
               "trunk_feature_std": 0.01, "trunk_effective_rank": 3.0, "trunk_dim": 96, "symptoms": symptoms}
              for i, loss, std, rank, symptoms in [(20, 500.0, 0.05, 40.0, {}),
                                                   (40, 300.0, 0.001, 1.5, {"feature_std": "std low"})]]
    (run / "health.jsonl").write_text("".join(json.dumps(record) + "\n" for record in health))
    checkpoint = run / "model_final_checkpoint_phase2.torch"
    row = {"kind": "knn", "model": "run/model_final_checkpoint_phase2", "dataset": "digits_val", "fraction": 1.0,
           "feature": "lastCLS", "k": 20, "top1": 71.25, "top5": 95.5}
    write_result({"kind": "knn", "manifest": {"models": [{"file": str(checkpoint.resolve())}]}, "rows": [row]},
                 tmp_path / "runs" / "eval" / "knn-run.json")
    other = tmp_path / "runs" / "other" / "model_final_checkpoint_phase2.torch"  # another run's checkpoint
    write_result({"kind": "knn", "manifest": {"models": [{"file": str(other)}]}, "rows": [{**row, "top1": 12.0}]},
                 tmp_path / "runs" / "eval" / "knn-other.json")

    assert main(["report", str(run)]) == 0
    text = (run / "report" / "summary.md").read_text()
    assert "| 0 | 22 | 4.5000 |" in text and "| 1 | 44 | 3.2500 |" in text
    assert ("Health after 40 updates (barlow_twins_loss): embedding feature std 0.0010 (spread out: 0.0625; "
            "first record 0.0500), effective rank 1.5 of 256") in text
    assert "**Collapse symptoms reported:** std low (update 40)." in text
    assert "| knn | run/model_final_checkpoint_phase2 | digits_val | 1 | lastCLS | 20 | 71.25 | 95.50 | knn-run.json |" \
        in text
    assert "12.00" not in text  # the other run's result is not this run's
    assert "| linear | run | digits_val |  |  |  | 61.25 | 88.50 | linear_probe.json |" in text  # in the run too
    assert_png(run / "report" / "training_health.png", "training_health")
    assert "](training_health.png)" in text


@pytest.mark.slow
def test_run_report_says_where_it_looked_for_results(trunk, images, tmp_path):
    run = make_run(tmp_path / "run", trunk, images)
    for path in (run / "eval").iterdir():
        path.unlink()
    assert main(["report", str(run)]) == 0
    text = (run / "report" / "summary.md").read_text()
    assert f"No evaluation results of this run's checkpoints in `{run}`" in text
    assert "enable HOOKS.CONVIT_HEALTH to record them" in text


def test_the_reports_gate_numbers_are_the_diagnostics_of_the_checkpoint(make_trunk, tmp_path):
    trunk = make_trunk(seed=3)
    set_gates(trunk, FINAL_GATES)
    checkpoint = tmp_path / "weights.torch"
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk.state_dict()}}}}, checkpoint)
    collected = report.collect_report(checkpoint)
    # The oracle: gating_diagnostics of the same weights on the report's sample image, normalised as ImageNet's.
    expected = gating_diagnostics(trunk, report.normalise(report.synthetic_image((32, 32))))
    torch.testing.assert_close(collected.final_gates, torch.tensor(FINAL_GATES))
    for key in ("gates", "positional_distance", "content_distance", "mixed_distance"):
        torch.testing.assert_close(collected.gates.end[key], expected[key])
    assert collected.gates.start is None and [r["start"] for r in collected.gates.rows] == pytest.approx([INIT] * 2)
    text = "\n".join(report.summary_lines(collected, figures=[]))  # the summary as rendered, without drawing
    distances = text.split("## Mean attention distance")[1]
    for layer in (1, 2):
        assert summary_row(text, layer).split(" | ")[2] == f"{expected['gates'][layer - 1].mean().item():.3f}"
        cells = summary_row(distances, layer).rstrip(" |").split(" | ")[1:]
        assert cells == [f"{expected[f'{kind}_distance'][layer - 1].mean().item():.2f}"
                         for kind in ("positional", "content", "mixed")]


def test_a_run_reports_its_last_records_diagnostics_and_its_checkpoints_gates(trunk, images, tmp_path):
    run = make_run(tmp_path / "run", trunk, images)  # the trunk ends with FINAL_GATES, as its last record
    collected = report.collect_report(run)
    expected = gating_diagnostics(trunk, images)
    for key in ("gates", "positional_distance", "content_distance", "mixed_distance"):
        torch.testing.assert_close(collected.gates.end[key], expected[key].double())
    torch.testing.assert_close(collected.gates.start["gates"], torch.full((2, 9), INIT, dtype=torch.float64))
    torch.testing.assert_close(collected.final_gates, torch.tensor(FINAL_GATES))
    assert [maps["blocks"] for maps in collected.attention_maps] == [[0], [1]]
    assert [row["file"] for row in collected.results] == [str(run / "eval" / "linear_probe.json")]


def test_a_result_file_under_two_searched_folders_is_listed_once(trunk, images, tmp_path):
    """``--results`` naming a folder inside a searched one (the run's own ``eval``) or around it (``runs``) must not
    list the same evaluation twice."""
    run = make_run(tmp_path / "runs" / "run", trunk, images)
    linear = str(run / "eval" / "linear_probe.json")
    for extra in ([run / "eval"], [tmp_path / "runs"], [tmp_path / "runs", run / "eval"]):
        collected = report.collect_report(run, results=extra)
        assert [Path(row["file"]).resolve() for row in collected.results] == [Path(linear).resolve()], extra


def test_the_results_of_a_checkpoint_file_since_replaced_are_not_the_runs(trunk, images, tmp_path):
    """The run folder was trained again (its checkpoints deleted, the same names written anew): an evaluation whose
    manifest holds the sha256 of the old file is another model's and is not listed as this run's."""
    from convit_ssl.evaluation.results import file_sha256

    run = make_run(tmp_path / "runs" / "run", trunk, images)
    checkpoint = run / "model_final_checkpoint_phase2.torch"
    row = {"kind": "knn", "model": "run", "dataset": "digits_val", "k": 20, "top1": 71.25}
    write_result({"kind": "knn", "manifest": {"models": [{"file": str(checkpoint.resolve()),
                                                          "sha256": file_sha256(checkpoint)}]}, "rows": [row]},
                 tmp_path / "runs" / "eval" / "knn-run.json")
    assert sorted(r["top1"] for r in report.collect_report(run).results) == [61.25, 71.25]
    set_gates(trunk, [[0.5] * 9, [0.5] * 9])  # the new run's weights
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk.state_dict()}}}}, checkpoint)
    assert [r["top1"] for r in report.collect_report(run).results] == [61.25]  # no sha256 recorded: kept


def test_a_figure_whose_drawing_fails_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "gates_final.png"
    report_figures.plot_gate_heatmap(torch.full((2, 9), INIT), path, "before")
    before = path.read_bytes()

    def cut_short(figure, target, **options):  # a kill or a full disk in the middle of the write
        with open(target, "wb") if isinstance(target, (str, os.PathLike)) else contextlib.nullcontext(target) as out:
            out.write(before[:100])
        raise OSError("No space left on device")

    monkeypatch.setattr(report_figures.Figure, "savefig", cut_short)
    with pytest.raises(OSError):
        report_figures.plot_gate_heatmap(torch.full((2, 9), 0.5), path, "after")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["gates_final.png"]


def test_the_epoch_losses_are_those_of_the_run_that_started_last_in_the_folder(tmp_path):
    """A run killed before its first checkpoint logged epochs 0 and 1; the run started over in the folder has
    logged epoch 0: the loss table is the new run's (VISSL appends to metrics.json; only a resume cuts it back)."""
    lines = [{"iteration": 22, "train_phase_idx": 0, "train_loss": 4.5},
             {"iteration": 44, "train_phase_idx": 1, "train_loss": 3.25},
             {"iteration": 22, "train_phase_idx": 0, "train_loss": 4.0},
             {"iteration": 22, "phase_idx": 1}]  # a test phase: no training loss
    (tmp_path / "metrics.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert report.load_epoch_losses(tmp_path) == [lines[2]]
