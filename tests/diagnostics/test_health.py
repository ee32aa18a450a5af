"""Collapse measures and symptoms on constructed collapsed and healthy cases, computed by hand."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from convit_ssl.health import effective_rank, feature_std, is_rising, mean_entropy, symptoms
from convit_ssl.health_hook import TrainingHealthHook, add_to_last_line, build_health_hook, dino_teacher_entropy

ORTHOGONAL = torch.eye(4) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # 4 images on 4 different axes
COLLAPSED = torch.tensor([[1.0, 2.0, 0.0, 0.0]]).repeat(4, 1) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])


def test_feature_std_hand_computed():
    # normalised rows e1..e4: each dimension holds one 1 and three 0s, std sqrt(1/4 - 1/16) = sqrt(3)/4
    assert math.isclose(feature_std(ORTHOGONAL), math.sqrt(3) / 4, rel_tol=1e-12)
    # every row normalises to the same vector: std 0
    assert feature_std(COLLAPSED) < 1e-12
    # two images on opposite sides: std 1 in the first dimension, 0 in the second, mean 1/2
    assert math.isclose(feature_std(torch.tensor([[3.0, 0.0], [-1.0, 0.0]])), 0.5, rel_tol=1e-12)


def test_effective_rank_hand_computed():
    # singular values of diag(1, 2, 3, 4): p = (1, 2, 3, 4) / 10, rank exp(-sum p ln p)
    p = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) / 10
    assert math.isclose(effective_rank(ORTHOGONAL), math.exp(-(p * p.log()).sum().item()), rel_tol=1e-9)
    assert math.isclose(effective_rank(torch.eye(5)), 5.0, rel_tol=1e-9)
    assert math.isclose(effective_rank(COLLAPSED), 1.0, rel_tol=1e-6)  # one non-zero singular value


def test_mean_entropy_uniform_and_one_hot():
    assert math.isclose(mean_entropy(torch.full((3, 8), 1 / 8)), math.log(8), rel_tol=1e-12)
    assert mean_entropy(torch.eye(4)) == 0.0
    assert math.isclose(mean_entropy(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])), math.log(2) / 2)


def test_is_rising():
    assert is_rising([1.0, 1.05, 1.1, 1.2, 1.3], window=5)
    assert not is_rising([1.3, 1.2, 1.1, 1.05, 1.0], window=5)  # falling
    assert not is_rising([1.0, 1.02, 0.99, 1.01, 1.0], window=5)  # noise around a level
    assert not is_rising([1.0, 1.2, 1.4], window=5)  # too few records yet
    assert is_rising([5.0, 1.0, 1.05, 1.1, 1.2, 1.3], window=5)  # only the last window counts


def test_healthy_case_has_no_symptom():
    assert symptoms("simclr_info_nce_loss", [5.0, 4.0], feature_std(ORTHOGONAL), effective_rank(ORTHOGONAL), 4,
                    window=5) == {}


def test_collapsed_features_are_named():
    found = symptoms("simclr_info_nce_loss", [4.85], feature_std(COLLAPSED), effective_rank(COLLAPSED), 4, window=5)
    assert set(found) == {"feature_std", "rank"}
    assert found["feature_std"].startswith("feature std 0.0000 is near 0 (spread-out features: about 0.500)")
    assert "effective rank 1.00 of 4 dimensions" in found["rank"]
    # as collapsed as at the start (a small net's embeddings are alike at init): not a symptom yet
    std, rank = feature_std(COLLAPSED), effective_rank(COLLAPSED)
    assert symptoms("moco_loss", [4.85], std, rank, 4, window=5, first=(std, rank)) == {}
    assert set(symptoms("moco_loss", [4.85], std, rank, 4, window=5, first=(0.2, 3.0))) == {"feature_std", "rank"}


def test_dino_uniform_teacher():
    # the teacher's output is the same for every prototype: a uniform distribution, entropy ln(K)
    uniform = SimpleNamespace(teacher_output=torch.full((6, 16), 0.3), center=torch.zeros(1, 16), teacher_temp=0.04)
    entropy, max_entropy = dino_teacher_entropy(uniform)
    assert math.isclose(entropy, math.log(16), rel_tol=1e-6) and math.isclose(max_entropy, math.log(16))
    std, rank = feature_std(ORTHOGONAL), effective_rank(ORTHOGONAL)
    found = symptoms("dino_loss", [math.log(16)], std, rank, 4, 5, entropy, max_entropy)
    assert list(found) == ["uniform_teacher"]
    # a sharp teacher (one prototype per image, centred away) is no uniform collapse, whatever the loss
    sharp = SimpleNamespace(teacher_output=torch.eye(16)[:6] * 10, center=torch.zeros(1, 16), teacher_temp=0.04)
    entropy, _ = dino_teacher_entropy(sharp)
    assert entropy < 1e-6
    assert symptoms("dino_loss", [math.log(16)], std, rank, 4, 5, entropy, max_entropy) == {}
    assert dino_teacher_entropy(SimpleNamespace()) is None  # before the DINO hook has run


def test_swav_loss_stuck_at_ln_prototypes():
    std, rank, ln_k = feature_std(ORTHOGONAL), effective_rank(ORTHOGONAL), math.log(100)
    stuck = [4.72, 4.66, 4.61, 4.606, 4.605, 4.6052]  # what an 8-epoch digits run logged (ln 100 = 4.6052)
    assert list(symptoms("swav_loss", stuck, std, rank, 4, 5, max_entropy=ln_k)) == ["uniform_assignment"]
    assert symptoms("swav_loss", stuck[:4], std, rank, 4, 5, max_entropy=ln_k) == {}  # too early to tell
    learning = [4.72, 4.5, 4.2, 3.9, 3.5, 3.2]
    assert symptoms("swav_loss", learning, std, rank, 4, 5, max_entropy=ln_k) == {}


def test_moco_loss_stuck_at_ln_queue_plus_one():
    std, rank, ln_queue = feature_std(ORTHOGONAL), effective_rank(ORTHOGONAL), math.log(257)
    stuck = [5.41734, 5.5241, 5.54342, 5.54427, 5.56639, 5.54906]  # a digits run with key momentum 0.9 (ln 257 = 5.549)
    assert list(symptoms("moco_loss", stuck, std, rank, 4, 5, max_entropy=ln_queue)) == ["uniform_contrast"]
    learning = [5.01731, 4.95089, 5.14572, 4.93762, 4.88951, 5.10869]  # queue 256, momentum 0.99: below 0.98 ln 257
    assert symptoms("moco_loss", learning, std, rank, 4, 5, max_entropy=ln_queue) == {}


def test_rising_loss_only_for_barlow_twins_and_swav():
    std, rank = feature_std(ORTHOGONAL), effective_rank(ORTHOGONAL)
    rising = [327.0, 400.0, 480.0, 590.0, 695.0]
    assert list(symptoms("barlow_twins_loss", rising, std, rank, 4, 5)) == ["rising_loss"]
    assert "from 327 to 695" in symptoms("barlow_twins_loss", rising, std, rank, 4, 5)["rising_loss"]
    assert list(symptoms("swav_loss", rising, std, rank, 4, 5)) == ["rising_loss"]
    assert symptoms("moco_loss", rising, std, rank, 4, 5) == {}  # MoCo's loss rises as its queue fills


def test_add_to_last_line(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"iteration": 10, "train_phase_idx": 0}) + "\n"
                    + json.dumps({"iteration": 20, "train_phase_idx": 1}) + "\n")
    assert add_to_last_line(path, 20, {"train_loss": 1.5})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"iteration": 10, "train_phase_idx": 0}, {"iteration": 20, "train_phase_idx": 1, "train_loss": 1.5}]
    before = path.read_text()
    assert not add_to_last_line(path, 30, {"train_loss": 2.0})  # the last line is of another iteration
    assert path.read_text() == before
    assert not add_to_last_line(tmp_path / "missing.json", 1, {})


def test_build_health_hook_checks_its_numbers():
    section = {"ENABLE": True, "FREQUENCY": 10, "PROBE_BATCH": 32, "LOSS_WINDOW": 5}
    hook = build_health_hook({"HOOKS": {"CONVIT_HEALTH": section}})
    assert (hook.frequency, hook.probe_batch, hook.loss_window) == (10, 32, 5)
    assert build_health_hook({"HOOKS": {"CONVIT_HEALTH": {**section, "ENABLE": False}}}) is None
    with pytest.raises(ValueError, match=r"HOOKS.CONVIT_HEALTH.FREQUENCY must be an integer >= 1, got 0"):
        build_health_hook({"HOOKS": {"CONVIT_HEALTH": {**section, "FREQUENCY": 0}}})
    with pytest.raises(ValueError, match=r"PROBE_BATCH must be an integer >= 2, got 'all'"):
        build_health_hook({"HOOKS": {"CONVIT_HEALTH": {**section, "PROBE_BATCH": "all"}}})


def _health_task(trunk, folder):
    """One training step as the health hook sees it: a batch, the head's output, the loss."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return SimpleNamespace(
        train=True, iteration=0, train_phase_idx=0, checkpoint_folder=str(folder),
        config={"LOSS": {"name": "simclr_info_nce_loss"}}, base_model=SimpleNamespace(trunk=trunk),
        last_batch=SimpleNamespace(sample={"input": [images]}, model_output=[ORTHOGONAL], loss=torch.tensor(4.5)))


def test_a_fresh_run_drops_the_records_of_a_run_killed_before_its_first_checkpoint(trunk, tmp_path):
    """The killed run recorded updates 1 to 3 and left no checkpoint: the run starts over in the folder, and its
    records alone make the log (else the report's first record and curves are the dead run's)."""
    from convit_ssl.run_folder import HEALTH_FILE

    killed = [{"iteration": iteration, "loss": 9.0, "feature_std": 0.5, "effective_rank": 3.0}
              for iteration in (1, 2, 3)]
    (tmp_path / HEALTH_FILE).write_text("".join(json.dumps(record) + "\n" for record in killed))
    task = _health_task(trunk, tmp_path)
    hook = TrainingHealthHook(frequency=1, probe_batch=2, loss_window=5)
    hook.on_start(task)
    hook.on_phase_start(task)
    hook.on_forward(task)
    hook.on_loss_and_meter(task)
    hook.on_update(task)
    records = [json.loads(line) for line in (tmp_path / HEALTH_FILE).read_text().splitlines()]
    assert [(record["iteration"], record["loss"]) for record in records] == [(1, 4.5)]
