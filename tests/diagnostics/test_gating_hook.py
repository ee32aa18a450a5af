"""The training hook: what it records, when, and that it leaves training untouched."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from convit_ssl import gating_hook
from convit_ssl.diagnostics import gating_diagnostics
from convit_ssl.gating_hook import GatingDiagnosticsHook, build_gating_hook
from convit_ssl.run_folder import METRICS_FILE, TENSORBOARD_DIR


class SSLModel(nn.Module):
    """Stands in for VISSL's BaseSSLMultiInputOutputModel: a ``trunk`` and a head."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.embed_dim, 4)


def fake_task(trunk, crops, folder, wrap_ddp=False):
    model = SSLModel(trunk)
    return SimpleNamespace(
        base_model=SimpleNamespace(module=model) if wrap_ddp else model,
        train=True, iteration=0, train_phase_idx=0, checkpoint_folder=str(folder),
        last_batch=SimpleNamespace(sample={"input": crops}),
    )


def read_records(folder):
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]


def test_records_match_the_parameters_at_the_logged_step(trunk, images, tmp_path):
    local_crops = torch.randn(4, 3, 16, 16)
    task = fake_task(trunk, [images, local_crops], tmp_path, wrap_ddp=True)
    hook = GatingDiagnosticsHook(frequency=3, probe_batch=2)
    expected = {}
    trunk.train()
    for step in range(7):
        hook.on_forward(task)  # before update `step + 1`: parameters after `step` updates
        expected[task.iteration] = torch.sigmoid(torch.stack([b.attn.gating.detach().clone()
                                                              for b in trunk.blocks[:2]]))
        task.last_batch.sample = {"input": [torch.randn(4, 3, 32, 32), local_crops]}  # later batches differ
        with torch.no_grad():  # the "optimizer step"
            for block in trunk.blocks[:2]:
                block.attn.gating.sub_(0.1 * torch.arange(9.0))
        task.iteration += 1
        hook.on_step(task)
        assert trunk.training and trunk.blocks[0].attn.training
    expected[task.iteration] = torch.sigmoid(torch.stack([b.attn.gating.detach() for b in trunk.blocks[:2]]))
    hook.on_phase_end(task)
    hook.on_phase_end(SimpleNamespace(**{**vars(task), "train": False}))  # test phases are skipped

    records = read_records(tmp_path)
    assert [r["iteration"] for r in records] == [0, 3, 6, 7]
    for record in records:
        logged = torch.tensor([layer["gates"] for layer in record["layers"]])
        torch.testing.assert_close(logged, expected[record["iteration"]])
        assert record["probe_images"] == 2 and record["epoch"] == 0 and record["grid_size"] == [8, 8]
    # The probe batch is the first two images of the first batch's first (global) crop.
    final = gating_diagnostics(trunk, images[:2])
    torch.testing.assert_close(torch.tensor([layer["content_distance"] for layer in records[-1]["layers"]]),
                               final["content_distance"])
    # The next epoch's first forward at iteration 7 does not write the same state twice.
    hook.on_forward(task)
    assert len(read_records(tmp_path)) == 4


def test_only_the_primary_process_writes(trunk, images, tmp_path, monkeypatch):
    monkeypatch.setattr(gating_hook, "is_primary", lambda: False)
    hook = GatingDiagnosticsHook(frequency=1, probe_batch=2)
    task = fake_task(trunk, images, tmp_path)
    hook.on_forward(task)
    hook.on_phase_end(task)
    assert not (tmp_path / METRICS_FILE).exists() and hook.probe is None


def test_tensorboard_scalars(trunk, images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hook = GatingDiagnosticsHook(frequency=5, probe_batch=2, output_dir=str(tmp_path / "out"), tensorboard=True)
    task = fake_task(trunk, {"images": images}, tmp_path / "unused")
    hook.on_forward(task)
    hook.on_end(task)
    events = EventAccumulator(str(tmp_path / "out" / TENSORBOARD_DIR))
    events.Reload()
    (scalar,) = events.Scalars("gating/layer1/head1")
    assert scalar.step == 0 and scalar.value == pytest.approx(0.7310586)
    record = read_records(tmp_path / "out")[0]
    (distance,) = events.Scalars("attention_distance/layer2/mixed")
    assert distance.value == pytest.approx(sum(record["layers"][1]["mixed_distance"]) / 9, rel=1e-5)


def test_a_trunk_without_gpsa_disables_the_hook(make_trunk, images, tmp_path):
    hook = GatingDiagnosticsHook(frequency=1, probe_batch=2)
    hook.on_forward(fake_task(make_trunk(local_up_to_layer=0), images, tmp_path))
    assert hook.disabled and not (tmp_path / METRICS_FILE).exists()


def test_build_gating_hook_from_config():
    assert build_gating_hook({"HOOKS": {}}) is None
    assert build_gating_hook({"HOOKS": {"CONVIT_GATING": {"ENABLE": False, "FREQUENCY": 10, "PROBE_BATCH": 4}}}) is None
    config = {"HOOKS": {"CONVIT_GATING": {"ENABLE": True, "FREQUENCY": 10, "PROBE_BATCH": 4},
                        "TENSORBOARD_SETUP": {"USE_TENSORBOARD": True}}}
    hook = build_gating_hook(config)
    assert (hook.frequency, hook.probe_batch, hook.tensorboard, hook.output_dir) == (10, 4, True, None)
    config["HOOKS"]["CONVIT_GATING"]["FREQUENCY"] = "often"
    with pytest.raises(ValueError, match="FREQUENCY must be a positive integer"):
        build_gating_hook(config)
    config["HOOKS"]["CONVIT_GATING"]["FREQUENCY"] = 0
    with pytest.raises(ValueError, match="positive integers"):
        build_gating_hook(config)


def test_a_resume_drops_the_records_after_the_checkpoint(trunk, images, tmp_path):
    """The killed run recorded iterations 0, 3 and 6 and a half line; it resumes from iteration 3's checkpoint."""
    lines = [json.dumps({"iteration": iteration, "layers": []}) + "\n" for iteration in (0, 3, 6)]
    (tmp_path / METRICS_FILE).write_text("".join(lines) + '{"iteration": 9, "lay')
    task = fake_task(trunk, images, tmp_path)
    task.checkpoint = {"iteration": 3, "train_phase_idx": 0}
    hook = GatingDiagnosticsHook(frequency=3, probe_batch=2)
    hook.on_start(task)
    assert [record["iteration"] for record in read_records(tmp_path)] == [0, 3]
    assert hook.last_iteration == 3  # iteration 3 is not recorded twice


def test_a_fresh_run_drops_the_records_of_a_run_killed_before_its_first_checkpoint(trunk, images, tmp_path):
    """The killed run recorded iterations 0, 3 and 6 and left no checkpoint: the run starts over in the folder, and
    its records alone make the log (else the report draws the dead run's 6 after the new run's 0 and 3)."""
    lines = [json.dumps({"iteration": iteration, "layers": [], "tag": "killed"}) + "\n" for iteration in (0, 3, 6)]
    (tmp_path / METRICS_FILE).write_text("".join(lines))
    task = fake_task(trunk, images, tmp_path)
    hook = GatingDiagnosticsHook(frequency=3, probe_batch=2)
    hook.on_start(task)
    hook.on_forward(task)
    assert [(record["iteration"], record.get("tag")) for record in read_records(tmp_path)] == [(0, None)]


def test_only_the_primary_process_cuts_the_log(trunk, images, tmp_path, monkeypatch):
    monkeypatch.setattr(gating_hook, "is_primary", lambda: False)
    (tmp_path / METRICS_FILE).write_text(json.dumps({"iteration": 0, "layers": []}) + "\n")
    GatingDiagnosticsHook(frequency=3, probe_batch=2).on_start(fake_task(trunk, images, tmp_path))
    assert len(read_records(tmp_path)) == 1
