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
    # VISSL reads .pkl file lists with pickle.load: any code in them would run on every node
    (["config.DATA.TRAIN.LABEL_PATHS=[labels.pkl]"], "config.DATA.TRAIN.LABEL_PATHS names labels.pkl, a pickle: "
     "VISSL would unpickle it, which runs any code the file holds; save the list with numpy.save as .npy and pass "
     "that"),
    (["config.DATA.TEST.DATA_PATHS=[images.pickle]"], "config.DATA.TEST.DATA_PATHS names images.pickle, a pickle"),
    # VISSL's multistep schedule (its defaults: values [0.1, 0.01, 0.001], milestones [30, 60]) over 2 epochs
    (["config.OPTIMIZER.param_schedulers.lr.name=multistep", "config.OPTIMIZER.num_epochs=2"],
     "OPTIMIZER.param_schedulers.lr.milestones=[30, 60] with OPTIMIZER.num_epochs=2: the learning rate drops at "
     "each milestone epoch, so each must be below num_epochs; lower config.OPTIMIZER.param_schedulers.lr.milestones, "
     "or raise config.OPTIMIZER.num_epochs to at least 61"),
]


@pytest.fixture
def digits(data_root, monkeypatch):
    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))


# make test-fast composes one case of each kind of check (type, amount, learning rate, batch against the data, a
# setting without effect); make test composes them all
FAST = {"config.OPTIMIZER.num_epochs=abc", "trunk.depth=abc", "trunk.depth=-2", "config.OPTIMIZER.num_epochs=0",
        "config.OPTIMIZER.param_schedulers.lr.schedulers.1.start_value=-0.001",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=1500", "config.LOSS.simclr_info_nce_loss.buffer_params.world_size=4",
        "config.MODEL.AMP_PARAMS.USE_AMP=true", "config.OPTIMIZER.param_schedulers.lr.name=multistep",
        "config.DATA.TRAIN.LABEL_PATHS=[labels.pkl]"}


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


# (schedule, num_epochs, what the line must say, {where}: its place in OPTIMIZER.param_schedulers; None: accepted).
# VISSL builds a multistep schedule with classy-vision's MultiStepParamScheduler (fvcore's) and num_updates =
# OPTIMIZER.num_epochs; a composite schedule passes num_epochs on to its parts.
_MILESTONES_OUT_OF_RANGE = ("OPTIMIZER.param_schedulers.{where}.milestones=%s with OPTIMIZER.num_epochs=%d: the "
                            "learning rate drops at each milestone epoch, so each must be below num_epochs; lower "
                            "config.OPTIMIZER.param_schedulers.{where}.milestones, or raise "
                            "config.OPTIMIZER.num_epochs to at least %d")
_MILESTONES_NOT_RISING = ("OPTIMIZER.param_schedulers.{where}.milestones=%s: the learning rate drops at each milestone "
                          "epoch, so each milestone must be above the one before, the first above 0; fix "
                          "config.OPTIMIZER.param_schedulers.{where}.milestones")
MULTISTEP = [
    ({"values": [0.1, 0.01], "milestones": [1]}, 2, None),
    ({"values": [0.1, 0.01, 0.001], "milestones": [3, 6]}, 7, None),
    ({"values": [0.1], "milestones": []}, 1, None),
    ({"values": [0.1, 0.01, 0.001]}, 3, None),  # no milestones: classy spreads num_epochs evenly
    ({"values": [0.1, 0.01], "milestones": [30]}, 2, _MILESTONES_OUT_OF_RANGE % ([30], 2, 31)),
    ({"values": [0.1, 0.01], "milestones": [2]}, 2, _MILESTONES_OUT_OF_RANGE % ([2], 2, 3)),
    ({"values": [0.1, 0.01, 0.001], "milestones": [4, 3]}, 7, _MILESTONES_NOT_RISING % [4, 3]),
    ({"values": [0.1, 0.01, 0.001], "milestones": [3, 3]}, 7, _MILESTONES_NOT_RISING % [3, 3]),
    ({"values": [0.1, 0.01], "milestones": [0]}, 7, _MILESTONES_NOT_RISING % [0]),
    ({"values": [0.1, 0.01, 0.001], "milestones": [3]}, 7, "OPTIMIZER.param_schedulers.{where} has 3 values and 1 "
     "milestones: give one milestone fewer than values (the epochs where the next value starts)"),
    ({"values": [0.1, 0.01, 0.001]}, 2, "OPTIMIZER.param_schedulers.{where} has 3 values but OPTIMIZER.num_epochs=2: "
     "give at least as many epochs as values, or fewer values"),
]


@pytest.mark.parametrize("schedule, epochs, message", MULTISTEP)
def test_a_multistep_schedule_is_refused_exactly_when_classy_vision_refuses_it(schedule, epochs, message):
    """Alone and as a part of a composite schedule; classy-vision builds the schedules of the same optimizer
    settings as VISSL does (build_optimizer_schedulers) and refuses them exactly then."""
    from classy_vision.optim import build_optimizer_schedulers

    from convit_ssl.config_checks import check_schedules

    lr = {"name": "multistep", **schedule}
    composite = {"name": "composite", "schedulers": [{"name": "constant", "value": 0.1}, lr], "lengths": [0.5, 0.5]}
    for where, schedules in (("lr", {"lr": lr}), ("lr.schedulers.1", {"lr": composite})):
        optimizer = {"num_epochs": epochs, "param_schedulers": schedules}
        try:
            build_optimizer_schedulers(optimizer)
        except ValueError:
            assert message is not None, where
            with pytest.raises(UsageError) as error:
                check_schedules(optimizer)
            assert str(error.value) == message.format(where=where)
        else:
            assert message is None, where
            check_schedules(optimizer)
