"""Wrong types, non-positive amounts and settings without effect stop in one line before anything starts."""
import re

import pytest

from convit_ssl import cli, engine
from convit_ssl.errors import UsageError
from tiny_training import TINY

REFUSED = [
    # (words, what the line must say)
    (["config.OPTIMIZER.num_epochs=abc"], "config.OPTIMIZER.num_epochs=abc: expected int, got str 'abc'"),
    (["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=1.5"], "expected int, got float 1.5"),
    (["config.HOOKS.CONVIT_GATING.ENABLE=3"], "config.HOOKS.CONVIT_GATING.ENABLE=3: expected bool"),  # our base's key
    (["config.CONVIT_SSL.MEAN=[a,b,c]"], "config.CONVIT_SSL.MEAN=[a,b,c]: expected list"),
    (["trunk.depth=abc"], "trunk.depth='abc': ConViT's depth is int"),
    (["trunk.qkv_bias=2"], "trunk.qkv_bias=2: ConViT's qkv_bias is bool"),
    (["trunk.img_size=[32,x]"], "ConViT's img_size is int | Sequence[int]"),
    (["trunk.depth=-2"], "depth=-2: ConViT needs depth >= 1"),
    (["trunk.drop_path_rate=-0.1"], "drop_path_rate=-0.1: a dropout probability, give 0 <= drop_path_rate < 1"),
    (["config.OPTIMIZER.num_epochs=-1"], "OPTIMIZER.num_epochs=-1: train at least 1 epoch"),
    (["config.OPTIMIZER.num_epochs=0"], "OPTIMIZER.num_epochs=0: train at least 1 epoch"),
    (["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=0"], "DATA.TRAIN.BATCHSIZE_PER_REPLICA=0: give at least 1"),
    (["config.OPTIMIZER.param_schedulers.lr.schedulers.1.start_value=-0.001"],
     "learning rate OPTIMIZER.param_schedulers.lr.schedulers.1.start_value=-0.001: learning rates must be positive"),
    (["config.OPTIMIZER.param_schedulers.lr.schedulers.0.end_value=0", "config.OPTIMIZER.param_schedulers.lr."
      "schedulers.1.start_value=0", "config.OPTIMIZER.param_schedulers.lr.schedulers.1.end_value=0",
      "config.OPTIMIZER.param_schedulers.lr.schedulers.0.start_value=0"], "learning rates must be positive"),
    # digits has 1,437 training images; with DROP_LAST a batch of 1,500 makes no batch
    (["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=1500"], "one batch is 1500 images x 1 processes = 1500, but the "
     "training set (digits) has 1437: with DROP_LAST no batch would be made; lower "
     "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA to at most 1437"),
    (["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=40", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
      "config.DATA.TRAIN.DATA_LIMIT=64"], "= 80, but the training set (digits) has 64"),
    (["config.LOSS.simclr_info_nce_loss.buffer_params.world_size=4"],
     "buffer_params.world_size=4 has no effect: VISSL sets it to 1 from DISTRIBUTED.NUM_NODES x NUM_PROC_PER_NODE"),
    (["config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim=64"],
     "LOSS.simclr_info_nce_loss.buffer_params.embedding_dim=64 but the head (MODEL.HEAD.PARAMS) outputs 128 dims"),
    (["config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MACHINE.DEVICE=cpu"],
     "config.MODEL.AMP_PARAMS.USE_AMP=true has no effect on a CPU"),
]


@pytest.fixture
def digits(data_root, monkeypatch):
    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))


# make test-fast composes one case of each kind of check (type, amount, learning rate, batch against the data, a
# setting without effect); make test composes them all
FAST = {"config.OPTIMIZER.num_epochs=abc", "trunk.depth=abc", "trunk.depth=-2", "config.OPTIMIZER.num_epochs=0",
        "config.OPTIMIZER.param_schedulers.lr.schedulers.1.start_value=-0.001",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=1500", "config.LOSS.simclr_info_nce_loss.buffer_params.world_size=4",
        "config.MODEL.AMP_PARAMS.USE_AMP=true"}


@pytest.mark.parametrize("words,message", [
    pytest.param(words, message, marks=() if words[0] in FAST else pytest.mark.slow, id=" ".join(words)[:60])
    for words, message in REFUSED])
def test_refused_in_one_line_before_anything_is_written(words, message, tmp_path, digits, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["train", *TINY, f"run_dir={run_dir}", *words, "--print-config"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert not captured.out and not run_dir.exists()


@pytest.mark.parametrize("recipe,words,message", [
    ("dino", ["config.LOSS.dino_loss.output_dim=4096"],
     "config.LOSS.dino_loss.output_dim=4096 has no effect: VISSL sets it to 65536 from the head's num_clusters"),
    pytest.param("swav", ["config.LOSS.swav_loss.num_prototypes=[100]"], "config.LOSS.swav_loss.num_prototypes=[100] "
                 "has no effect: VISSL sets it to [3000] from the head's num_clusters", marks=pytest.mark.slow),
    pytest.param("swav", ["config.LOSS.swav_loss.embedding_dim=64"],
                 "VISSL sets it to 128 from the head's last dims entry", marks=pytest.mark.slow),
    pytest.param("moco", ["config.LOSS.moco_loss.embedding_dim=64"],
                 "LOSS.moco_loss.embedding_dim=64 but the head (MODEL.HEAD.PARAMS) outputs 128 dims",
                 marks=pytest.mark.slow),
])
def test_a_loss_setting_the_head_decides_is_refused_when_it_differs(recipe, words, message, tmp_path, digits):
    with pytest.raises(UsageError, match=re.escape(message)):
        engine.compose([f"config={recipe}", "data=digits", *words], run_dir=str(tmp_path / "run"))


def test_settings_that_agree_or_take_effect_pass(tmp_path, digits):
    config = engine.compose(["config=dino", "data=digits", "config.LOSS.dino_loss.output_dim=65536",
                             "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=0.001",  # scaled: used
                             "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32", "trunk.img_size=[32,32]",
                             "trunk.mlp_ratio=2", "config.OPTIMIZER.num_epochs=2"], run_dir=str(tmp_path / "run"))
    assert config.LOSS.dino_loss.output_dim == 65536 and config.OPTIMIZER.num_epochs == 2
    assert config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value == 0.001
    assert config.MODEL.TRUNK.CONVIT_SSL.OVERRIDES.mlp_ratio == 2


def test_the_launcher_refuses_before_printing_or_submitting(tmp_path, digits, capsys, monkeypatch):
    from convit_ssl import launch

    monkeypatch.setenv("CONVIT_SSL_RUNS", str(tmp_path / "runs"))
    assert launch.main(["--dry-run", "--partition", "gpu", *TINY, "config.OPTIMIZER.num_epochs=abc"]) == 2
    captured = capsys.readouterr()
    assert "config.OPTIMIZER.num_epochs=abc: expected int" in captured.err and "#SBATCH" not in captured.out
    assert not (tmp_path / "runs").exists()
