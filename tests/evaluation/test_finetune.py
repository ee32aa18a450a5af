"""Fine-tuning: label subsets and file lists, layer-wise lr decay, mixup/cutmix targets, bad input, and tiny runs of
`convit-ssl finetune` through VISSL's engine (random init, a checkpoint, a resume)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from convit_ssl.errors import UsageError
from convit_ssl.evaluation.finetune import choose_labels, parse_labels, summarise
from convit_ssl.evaluation.subsets import class_subset

CLASSES = ["a", "b", "c"]
# 3 classes of 20, 10 and 5 images; file names unique, as in an ImageNet train folder
LABELS = np.array([0] * 20 + [1] * 10 + [2] * 5)
FILES = [f"/data/train/{CLASSES[label]}/img{index:03d}.png" for index, label in enumerate(LABELS)]


def _kept(subset):
    return set(subset.train) | set(subset.heldout)


def test_labels_fraction_is_the_nested_class_subset_split_into_train_and_heldout():
    small, large = (choose_labels(spec, LABELS, FILES, CLASSES, seed=3) for spec in ("20%", "60%"))
    assert _kept(small) == set(class_subset(LABELS, 0.2, seed=3))
    assert _kept(small) <= _kept(large)
    assert not set(small.train) & set(small.heldout)
    # 20% of 20 = 4 images: 1 held out (10%, at least 1); of 10: 2, 1 held out; of 5: 1, kept for training
    assert np.bincount(LABELS[small.heldout], minlength=3).tolist() == [1, 1, 0]
    assert np.bincount(LABELS[small.train], minlength=3).tolist() == [3, 1, 1]


def test_labels_per_class_take_the_same_order_as_fractions():
    three = choose_labels("3-per-class", LABELS, FILES, CLASSES, seed=1)
    assert np.bincount(LABELS[list(_kept(three))]).tolist() == [3, 3, 3]
    five = choose_labels("5-per-class", LABELS, FILES, CLASSES, seed=1)
    assert _kept(three) <= _kept(five)
    # all 5 of class c, in the order class_subset draws: its 100% subset
    assert {i for i in _kept(five) if LABELS[i] == 2} == set(np.flatnonzero(LABELS == 2))


def test_a_larger_heldout_fraction_holds_out_more_of_each_class_but_never_its_last_image():
    """20% of 20, 10, 5 images keeps 4, 2, 1; half of each held out, rounded half up: 2, 1 and (a class keeps its
    last image) 0."""
    subset = choose_labels("20%", LABELS, FILES, CLASSES, seed=3, heldout_fraction=0.5)
    assert _kept(subset) == _kept(choose_labels("20%", LABELS, FILES, CLASSES, seed=3))  # the same labels
    assert np.bincount(LABELS[subset.heldout], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(LABELS[subset.train], minlength=3).tolist() == [2, 1, 1]


def test_labels_from_a_file_list_of_file_names(tmp_path):
    listing = tmp_path / "subset.txt"
    listing.write_text("img000.png\nimg025.png\n\nimg031.png\nimg001.png\n")
    subset = choose_labels(str(listing), LABELS, FILES, CLASSES, heldout_fraction=0.0)
    assert sorted(subset.train) == [0, 1, 25, 31] and len(subset.heldout) == 0


def test_a_file_list_names_images_of_folders_that_reuse_file_names_by_their_path(tmp_path):
    # every class folder holds 0.png .. 4.png (a user's own folder): a name alone would pick class a's image
    files = [f"/data/train/{name}/{index}.png" for name in CLASSES for index in range(5)]
    labels = np.repeat([0, 1, 2], 5)
    listing = tmp_path / "subset.txt"
    listing.write_text("a/0.png\nb/0.png\nc/3.png\n")
    subset = choose_labels(str(listing), labels, files, CLASSES, heldout_fraction=0.0)
    assert sorted(subset.train) == [0, 5, 13]
    listing.write_text("a/0.png\n0.png\n")
    with pytest.raises(UsageError, match=r"file list .* name 0.png is that of 3 training images .*its path inside"):
        choose_labels(str(listing), labels, files, CLASSES)


@pytest.mark.parametrize("content, message", [
    ("img000.png\nimg999.png\nimg025.png\nimg031.png\n", "names 1 of its 4 images that the training split does not"),
    ("img000.png\nimg025.png\n", "1 of 3 classes keep no image (first: c)"),
    ("\n", "names no image"),
])
def test_bad_file_lists_are_refused_in_one_line(tmp_path, content, message):
    listing = tmp_path / "subset.txt"
    listing.write_text(content)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        choose_labels(str(listing), LABELS, FILES, CLASSES)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("spec, message", [
    ("6-per-class", "class 'c' has only 5 training images"),
    ("0%", r"percentage in \(0, 100\]"),
    ("150%", r"percentage in \(0, 100\]"),
    ("0-per-class", "at least 1 image per class"),
    ("tenpercent", "neither a percentage"),
])
def test_bad_label_specs_are_refused(spec, message):
    with pytest.raises(UsageError, match=message):
        choose_labels(spec, LABELS, FILES, CLASSES)


def test_parse_labels():
    assert parse_labels(None) == ("fraction", 1.0)
    assert parse_labels("10%") == ("fraction", 0.1)
    assert parse_labels("0.5%") == ("fraction", 0.005)
    assert parse_labels("13-per-class") == ("per_class", 13)


def test_summarise_picks_the_best_heldout_epoch_and_the_final_one():
    records = [{"epoch": 0, "heldout_images": 5, "heldout_top1": 40.0, "test_top1": 41.0, "test_top5": 90.0},
               {"epoch": 1, "heldout_images": 5, "heldout_top1": 80.0, "test_top1": 70.0, "test_top5": 95.0},
               {"epoch": 2, "heldout_images": 5, "heldout_top1": 80.0, "test_top1": 72.0, "test_top5": 96.0},
               {"epoch": 3, "heldout_images": 5, "heldout_top1": 60.0, "test_top1": 75.0, "test_top5": 97.0}]
    chosen = summarise(records)
    assert chosen["final"]["epoch"] == 3 and chosen["heldout"]["epoch"] == 1  # the first of the equal best
    assert summarise([{"epoch": 0, "heldout_images": 0, "test_top1": 1.0}])["heldout"] is None


# ---------------------------------------------------------------------------------------------------------------
# Through VISSL: layer decay, mixup/cutmix
# ---------------------------------------------------------------------------------------------------------------
def _compose(words, data_root, monkeypatch):
    from convit_ssl import engine

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    return engine.compose(words)


def test_layer_decay_factor_per_parameter_matches_a_hand_computed_table(data_root, monkeypatch):
    """depth 2, decay 0.5: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, final norm and head 1; checked on the
    parameter groups VISSL's trainer builds, whose lr schedules are VISSL's scaled by the factor."""
    from classy_vision.optim import build_optimizer_schedulers
    from vissl.models import build_model
    import vissl.trainer.train_task as train_task

    config = _compose(["config=convit_ssl/benchmark/finetune/digits", "trunk.depth=2", "trunk.local_up_to_layer=1",
                       "config.OPTIMIZER.layer_decay=0.5"], data_root, monkeypatch)
    model = build_model(config.MODEL, config.OPTIMIZER)
    schedulers = build_optimizer_schedulers(config.OPTIMIZER)
    groups = train_task.get_optimizer_param_groups(model, config.MODEL, config.OPTIMIZER, schedulers)
    expected = {"trunk.patch_embed.proj.weight": 0.125, "trunk.patch_embed.proj.bias": 0.125,
                "trunk.pos_embedding": 0.125, "trunk.class_token": 0.125,
                "trunk.blocks.0.attn.gating": 0.25, "trunk.blocks.0.attn.qk.weight": 0.25,
                "trunk.blocks.0.norm1.weight": 0.25, "trunk.blocks.1.mlp.fc2.weight": 0.5,
                "trunk.blocks.1.attn.qkv.weight": 0.5, "trunk.norm.weight": 1.0, "heads.0.clf.0.weight": 1.0,
                "heads.0.clf.0.bias": 1.0}
    group_of = {id(p): group for group in groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert set(expected) <= set(names)
    assert len(group_of) == len(names)  # every parameter in exactly one group
    where = 0.4
    base = schedulers["lr"](where)
    for name, factor in expected.items():
        assert group_of[id(names[name])]["lr"](where) == pytest.approx(factor * base, rel=1e-12), name
    decayed = {name for name in names if group_of[id(names[name])]["weight_decay"] != 0.0}
    assert "trunk.blocks.0.attn.qk.weight" in decayed and "heads.0.clf.0.weight" in decayed
    for name in ("trunk.pos_embedding", "trunk.class_token", "trunk.blocks.0.attn.gating",
                 "trunk.blocks.0.norm1.weight", "trunk.blocks.1.mlp.fc2.bias"):
        assert name not in decayed, name  # the official code decays no 1-D tensor and no embedding


def test_layer_decay_off_keeps_vissls_groups(data_root, monkeypatch):
    from classy_vision.optim import build_optimizer_schedulers
    from vissl.models import build_model
    import vissl.trainer.train_task as train_task

    config = _compose(["config=convit_ssl/benchmark/finetune/digits"], data_root, monkeypatch)
    model = build_model(config.MODEL, config.OPTIMIZER)
    schedulers = build_optimizer_schedulers(config.OPTIMIZER)
    groups = train_task.get_optimizer_param_groups(model, config.MODEL, config.OPTIMIZER, schedulers)
    assert all(group["lr"] is schedulers["lr"] or group["lr"] is schedulers["lr_head"] for group in groups)


def test_mixup_cutmix_targets_of_the_imagenet_recipe_sum_to_one(data_root, monkeypatch):
    from vissl.data.collators import get_collator

    config = _compose(["config=convit_ssl/benchmark/finetune/imagenet1k", "data=digits"], data_root, monkeypatch)
    train = config.DATA.TRAIN
    assert train.COLLATE_FUNCTION == "cutmixup_collator"
    params = dict(train.COLLATE_FUNCTION_PARAMS)
    assert (params["mixup_alpha"], params["cutmix_alpha"], params["label_smoothing"]) == (0.8, 1.0, 0.1)
    collate = get_collator(train.COLLATE_FUNCTION, params)
    torch.manual_seed(0)
    mixed = 0
    for _ in range(8):
        batch = [{"data": [torch.randn(3, 8, 8)], "label": [i % 10], "data_valid": [1], "data_idx": [i]}
                 for i in range(6)]
        targets = collate(batch)["label"][0]
        assert targets.shape == (6, 10)
        torch.testing.assert_close(targets.sum(1), torch.ones(6, dtype=targets.dtype))
        assert targets.min() >= 0.1 / 10 - 1e-6  # smoothing spreads 0.1 over the classes
        mixed += int((targets.max(1).values < 0.9).all())  # a smoothed one-hot target peaks at 0.91
    assert mixed > 0


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, before training
# ---------------------------------------------------------------------------------------------------------------
def _finetune(args, data_root, monkeypatch, capsys):
    from convit_ssl.cli import main

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    code = main(["finetune", *args])
    return code, capsys.readouterr().err.strip()


def test_a_checkpoint_that_is_not_a_convit_is_refused(tmp_path, data_root, monkeypatch, capsys):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    code, error = _finetune(["--checkpoint", str(path), "--recipe", "digits", f"run_dir={tmp_path / 'run'}"],
                            data_root, monkeypatch, capsys)
    assert code == 2 and "not a ConViT/DeiT state dict" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_head_that_does_not_fit_the_classes_is_refused(tmp_path, data_root, monkeypatch, capsys):
    code, error = _finetune(["--checkpoint", "random", "--recipe", "digits", "config.CONVIT_SSL.NUM_CLASSES=7",
                             f"run_dir={tmp_path / 'run'}"], data_root, monkeypatch, capsys)
    assert code == 2 and len(error.splitlines()) == 1
    assert "the head predicts 7 classes but digits has 10: set config.CONVIT_SSL.NUM_CLASSES=10" in error
    assert not (tmp_path / "run").exists()


def test_a_trunk_that_does_not_fit_the_checkpoint_is_refused(tmp_path, data_root, monkeypatch, capsys):
    from convit_ssl.models import create_trunk

    path = tmp_path / "trunk.pth"
    torch.save(create_trunk("convit_tiny", img_size=32, patch_size=4, embed_dim=48, depth=2,
                            local_up_to_layer=1).state_dict(), path)
    code, error = _finetune(["--checkpoint", str(path), "--recipe", "digits", "trunk.embed_dim=64",
                             f"run_dir={tmp_path / 'run'}"], data_root, monkeypatch, capsys)
    assert code == 2 and len(error.splitlines()) == 1 and "does not fit the trunk" in error
    assert not (tmp_path / "run").exists()


def test_heldout_fraction_is_recorded_and_names_its_own_run_folder(tmp_path, data_root, monkeypatch):
    from convit_ssl.evaluation.finetune import prepare

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    monkeypatch.setenv("CONVIT_SSL_RUNS", str(tmp_path / "runs"))
    default, half = (prepare("random", "digits", "5-per-class", heldout_fraction=fraction) for fraction in (0.1, 0.4))
    assert default.label_subset["heldout_fraction"] == 0.1 and half.label_subset["heldout_fraction"] == 0.4
    # 5 per class: 10% holds out 1 (at least one), 40% holds out 2 (rounded half up)
    assert (default.label_subset["heldout_images"], half.label_subset["heldout_images"]) == (10, 20)
    assert len(np.load(half.label_subset["heldout_list"])) == 20
    assert default.run_dir != half.run_dir  # a rerun with another held-out part is another run


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_a_heldout_fraction_outside_0_1_is_refused_in_one_line(tmp_path, data_root, monkeypatch, capsys, value):
    code, error = _finetune(["--checkpoint", "random", "--recipe", "digits", "--heldout-fraction", value,
                             f"run_dir={tmp_path / 'run'}"], data_root, monkeypatch, capsys)
    assert code == 2 and len(error.splitlines()) == 1
    assert f"--heldout-fraction {value} is outside [0, 1): pass e.g. 0.1" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options", [
    dict(img_size=32, patch_size=4, embed_dim=48, depth=3, local_up_to_layer=2, mlp_ratio=2.0),
    dict(img_size=[32, 48], patch_size=8, embed_dim=64, depth=2, num_heads=4, local_up_to_layer=0, qkv_bias=True,
         pos_embed_class_token=True),
])
def test_the_shape_of_a_trunk_rebuilds_its_tensors(options):
    from convit_ssl.evaluation.finetune import trunk_shape
    from convit_ssl.models import create_trunk

    trunk = create_trunk("convit_tiny", **options)
    rebuilt = create_trunk("convit_tiny", **trunk_shape(trunk))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in trunk.state_dict().items()}


def test_an_unknown_recipe_is_refused(data_root, monkeypatch, capsys):
    code, error = _finetune(["--checkpoint", "random", "--recipe", "mnist"], data_root, monkeypatch, capsys)
    assert code == 2 and "unknown fine-tuning recipe 'mnist': choose from cifar10, cifar100, digits, imagenet1k" in error


# VISSL's own fine-tuning configs with our trunk, described by VISSL's VISION_TRANSFORMERS / CONVIT keys as a user of
# them would (width 48, 2 blocks, 1 GPSA, 4 heads), on 32 px digits: the issue asks that they run with NAME: convit_ssl
SEMI_SUPERVISED = "benchmark/semi_supervised/imagenet1k/eval_resnet_8gpu_transfer_in1k_semi_sup_fulltune"
FULLTUNE = "benchmark/fulltune/imagenet1k/eval_vit_8gpu_transfer_in1k_finetune"
_VIT = "config.MODEL.TRUNK.VISION_TRANSFORMERS"
VISSL_TINY = ["config.MODEL.TRUNK.NAME=convit_ssl", f"{_VIT}.IMAGE_SIZE=32", f"{_VIT}.PATCH_SIZE=8",
              f"{_VIT}.HIDDEN_DIM=48", f"{_VIT}.NUM_LAYERS=2", f"{_VIT}.NUM_HEADS=4", f"{_VIT}.MLP_DIM=192",
              "config.MODEL.TRUNK.CONVIT.N_GPSA_LAYERS=1", "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[48,10]}]]",
              "config.MACHINE.DEVICE=cpu", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DISTRIBUTED.BACKEND=gloo",
              "config.DATA.NUM_DATALOADER_WORKERS=0", "config.DATA.TRAIN.DATASET_NAMES=[digits]",
              "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=10", "config.DATA.TRAIN.TRANSFORMS.0.size=32",
              "config.DATA.TRAIN.MMAP_MODE=False", "config.DATA.TEST.DATASET_NAMES=[digits]",
              "config.DATA.TEST.BATCHSIZE_PER_REPLICA=10", "config.DATA.TEST.DATA_LIMIT=20",
              "config.DATA.TEST.TRANSFORMS.0.size=32", "config.DATA.TEST.TRANSFORMS.1.size=32",
              "config.DATA.TEST.MMAP_MODE=False", "config.OPTIMIZER.num_epochs=2", "config.LOG_FREQUENCY=1"]


def test_vissls_semi_supervised_config_without_weights_is_refused_in_one_line(data_root, monkeypatch):
    """Its PARAMS_FILE is the placeholder "specify model": refused at compose, not by an assert on the node."""
    with pytest.raises(UsageError, match="config.MODEL.WEIGHTS_INIT.PARAMS_FILE 'specify model' is not a file: "
                                         "pass config.MODEL.WEIGHTS_INIT.PARAMS_FILE=CHECKPOINT") as error:
        _compose([f"config={SEMI_SUPERVISED}", *VISSL_TINY], data_root, monkeypatch)
    assert "\n" not in str(error.value)


# The trunk VISSL_TINY describes, as create_trunk's keywords
VISSL_TINY_TRUNK = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.0,
                        local_up_to_layer=1)


def _ssl_checkpoint(path, heads, **trunk_changes):
    """A VISSL checkpoint at ``path`` of the VISSL_TINY trunk (with ``trunk_changes``, create_trunk's keywords) and
    the SSL heads ``heads`` ({name: tensor})."""
    from convit_ssl.models import create_trunk

    trunk = create_trunk("convit_tiny", **{**VISSL_TINY_TRUNK, **trunk_changes}).state_dict()
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}}}, path)
    return path


def test_an_ssl_checkpoint_whose_head_differs_from_the_classifier_is_refused_in_one_line(tmp_path, data_root,
                                                                                          monkeypatch):
    """VISSL loads every head tensor of the checkpoint that the model has by name and asserts on the node that the
    shapes agree: an SSL projection head (128 x 48) cannot start the 10-way classifier (10 x 48)."""
    checkpoint = _ssl_checkpoint(tmp_path / "ssl.torch", {"0.clf.0.weight": torch.zeros(128, 48)})
    with pytest.raises(UsageError, match=re.escape(
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {checkpoint}: its heads.0.clf.0.weight is [128, 48] but the "
            f"model's (MODEL.HEAD.PARAMS) is [10, 48]; start the heads from random init with "
            f"config.MODEL.WEIGHTS_INIT.SKIP_LAYERS=[num_batches_tracked,heads]")) as error:
        _compose([f"config={SEMI_SUPERVISED}", *VISSL_TINY, "config.OPTIMIZER.param_schedulers.lr.milestones=[1]",
                  f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}"], data_root, monkeypatch)
    assert "\n" not in str(error.value)


_NO_KEY = "config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME=''"
_HEADS_SKIPPED = ["config.OPTIMIZER.param_schedulers.lr.milestones=[1]",
                  "config.MODEL.WEIGHTS_INIT.SKIP_LAYERS=[num_batches_tracked,heads]"]


@pytest.mark.parametrize("trunk_changes, model_words, message", [
    # VISSL copies the tensors it finds and logs the others as "not initialized": the GPSA block would train from
    # random init, silently
    (dict(local_up_to_layer=0), [], "missing: blocks.0.attn.gating, blocks.0.attn.positional_proj.bias, "
                                    "blocks.0.attn.positional_proj.weight, blocks.0.attn.qk.weight, "
                                    "blocks.0.attn.v.weight; unexpected: blocks.0.attn.qkv.weight); check the trunk "
                                    "(model=PRESET, trunk.FIELD=VALUE, config.MODEL.TRUNK) against the checkpoint's"),
    # VISSL asserts on the node that each shape agrees
    (dict(embed_dim=64), [], "mis-shaped (checkpoint vs model): blocks.0.attn.proj.bias (64,) vs (48,), "),
    # the same trunk pretrained at another size: our trunk resamples its position embedding to any crop size
    ({}, [f"{_VIT}.IMAGE_SIZE=64"], "mis-shaped (checkpoint vs model): pos_embedding (1, 16, 48) vs (1, 64, 48)); "
                                    "its position embedding is for a 4 x 4 patch grid: build the trunk at that grid "
                                    "with trunk.img_size=32 (it takes crops of any size, resampling the positions)"),
], ids=["deit-twin-into-convit", "wider", "other-image-size"])
def test_a_checkpoint_whose_trunk_differs_from_the_model_is_refused_in_one_line(tmp_path, data_root, monkeypatch,
                                                                               trunk_changes, model_words, message):
    checkpoint = _ssl_checkpoint(tmp_path / "ssl.torch", {}, **trunk_changes)
    with pytest.raises(UsageError, match=re.escape(
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {checkpoint} does not fit the trunk (")) as error:
        _compose([f"config={SEMI_SUPERVISED}", *VISSL_TINY, *_HEADS_SKIPPED, *model_words,
                  f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}"], data_root, monkeypatch)
    assert message in str(error.value) and "\n" not in str(error.value)


LINEAR = "benchmark/linear_image_classification/imagenet1k/models/deit_s16"


def test_a_linear_probe_checks_the_trunk_it_loads_and_not_the_heads(tmp_path, data_root, monkeypatch):
    """VISSL's linear config (feature evaluation, frozen trunk) copies only the trunk: an SSL head in the file does
    not matter, a trunk of another layout does."""
    words = [f"config={LINEAR}", *VISSL_TINY]
    fitting = _ssl_checkpoint(tmp_path / "ssl.torch", {"0.clf.0.weight": torch.zeros(128, 48)})
    config = _compose([*words, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={fitting}"], data_root, monkeypatch)
    assert config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON and config.MODEL.WEIGHTS_INIT.PARAMS_FILE == str(fitting)
    twin = _ssl_checkpoint(tmp_path / "twin.torch", {}, local_up_to_layer=0)
    with pytest.raises(UsageError, match=re.escape(f"PARAMS_FILE {twin} does not fit the trunk (missing: ")):
        _compose([*words, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={twin}"], data_root, monkeypatch)


@pytest.mark.parametrize("words", [
    # VISSL's advice for a torchvision model: its compatibility check then passes, and no name matches ConViT's
    [_NO_KEY, "config.MODEL.WEIGHTS_INIT.APPEND_PREFIX=trunk._feature_blocks."],
    # the names match ConViT's, and VISSL's compatibility check raises on the node
    [_NO_KEY, "config.MODEL.WEIGHTS_INIT.APPEND_PREFIX=trunk."],
], ids=["feature-blocks-prefix", "trunk-prefix"])
def test_a_params_file_read_outside_vissls_layout_is_refused_in_one_line(tmp_path, data_root, monkeypatch, words):
    """VISSL reads a file that is not a classy_state_dict only into trunks whose tensors sit under _feature_blocks:
    ConViT's would stay at random init, with "Not found" in the log, or the file is refused on the node."""
    from convit_ssl.models import create_trunk

    checkpoint = tmp_path / "bare.pth"
    torch.save(create_trunk("convit_tiny", **VISSL_TINY_TRUNK).state_dict(), checkpoint)
    with pytest.raises(UsageError, match=re.escape(
            "config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME='': VISSL reads a PARAMS_FILE in a layout other than "
            "classy_state_dict only into trunks whose tensors sit under _feature_blocks, and ConViT's do not (its "
            "trunk would stay at random init, or VISSL would refuse the file on the node): pass a VISSL checkpoint "
            f"with STATE_DICT_KEY_NAME=classy_state_dict, or start from this file with `convit-ssl finetune "
            f"--checkpoint {checkpoint}`, which also reads timm and official ConViT files")) as error:
        _compose([f"config={SEMI_SUPERVISED}", *VISSL_TINY, *_HEADS_SKIPPED, *words,
                  f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}"], data_root, monkeypatch)
    assert "\n" not in str(error.value)


_POOL_MAP = "config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP"


@pytest.mark.parametrize("pool_map, message", [
    # a ResNet's feature names: VISSL asked the trunk for them on the node, after the run had started
    ("[[res5,[AvgPool2d,[[6,6],1,0]]]]", f"{_POOL_MAP}: unknown feature key 'res5'; valid keys: lastCLS, lastPOOL, "
                                         f"concatCLS<1..1>, concatPOOL<1..2>, blkCLS<1..1>, blkPOOL<0..1>"),
    ("[[lastCLS,[Identity,[]]],[blkCLS0,[Identity,[]]]]", f"{_POOL_MAP}: feature key 'blkCLS0': only the last 1 of 2 "
                                                          f"blocks carry a class token"),
    ("[[concatPOOL2,[AdaptiveAvgPool2d,[[1,1]]]]]", f"{_POOL_MAP}: concatPOOL2 is pooled with AdaptiveAvgPool2d, but "
                                                    f"the trunk's features are already vectors, (batch, width): use "
                                                    f"[concatPOOL2, [Identity, []]]"),
], ids=["resnet-names", "class-token-of-a-gpsa-block", "pooled-again"])
def test_features_a_linear_probe_cannot_get_from_the_trunk_are_refused_in_one_line(tmp_path, data_root, monkeypatch,
                                                                                  pool_map, message):
    checkpoint = _ssl_checkpoint(tmp_path / "ssl.torch", {})
    with pytest.raises(UsageError, match=re.escape(message)) as error:
        _compose([f"config={LINEAR}", *VISSL_TINY, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}",
                  f"{_POOL_MAP}={pool_map}"], data_root, monkeypatch)
    assert "\n" not in str(error.value)


def test_features_the_trunk_gives_compose_for_a_linear_probe(tmp_path, data_root, monkeypatch):
    checkpoint = _ssl_checkpoint(tmp_path / "ssl.torch", {})
    config = _compose([f"config={LINEAR}", *VISSL_TINY, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}",
                       f"{_POOL_MAP}=[[lastCLS,[Identity,[]]]]"], data_root, monkeypatch)
    assert config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP == [["lastCLS", ["Identity", []]]]


@pytest.mark.parametrize("config_name, words, message", [
    # VISSL's ViT-S/16 probe head on a 48-wide trunk: a traceback at the first step, after the run had started
    (LINEAR, ["config.MODEL.HEAD.PARAMS=[[mlp,{dims:[384,10]}]]"],
     "config.MODEL.HEAD.PARAMS: head 0 (mlp) cannot take the trunk's lastCLS features, 48 wide (a and b must have "
     "same reduction dim, but got [2, 48] X [384, 10].); make it take (batch, 48) vectors (mlp: dims [48, ...])"),
    # one head per feature: concatPOOL2 is two blocks' pooled tokens, 96 wide
    (LINEAR, [f"{_POOL_MAP}=[[lastCLS,[Identity,[]]],[concatPOOL2,[Identity,[]]]]",
              "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[48,10]}],[mlp,{dims:[48,10]}]]"],
     "config.MODEL.HEAD.PARAMS: head 1 (mlp) cannot take the trunk's concatPOOL2 features, 96 wide"),
    (LINEAR, [f"{_POOL_MAP}=[[lastCLS,[Identity,[]]],[concatPOOL2,[Identity,[]]]]"],
     "config.MODEL.HEAD.PARAMS has 1 head for the 2 features of config.MODEL.FEATURE_EVAL_SETTINGS."
     "LINEAR_EVAL_FEAT_POOL_OPS_MAP (lastCLS, concatPOOL2): give one head per feature"),
], ids=["probe-head-of-vit-s", "one-head-per-feature", "fewer-heads-than-features"])
def test_heads_that_cannot_take_the_trunks_features_are_refused_in_one_line(tmp_path, data_root, monkeypatch,
                                                                           config_name, words, message):
    checkpoint = _ssl_checkpoint(tmp_path / "ssl.torch", {})
    with pytest.raises(UsageError, match=re.escape(message)) as error:
        _compose([f"config={config_name}", *VISSL_TINY, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}",
                  *words], data_root, monkeypatch)
    assert "\n" not in str(error.value)


def test_heads_that_take_the_trunks_features_compose(tmp_path, data_root, monkeypatch):
    """One head per feature, each as wide as its feature; a head of several layers run in sequence on one feature."""
    checkpoint = _ssl_checkpoint(tmp_path / "ssl.torch", {})
    words = [f"config={LINEAR}", *VISSL_TINY, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}"]
    _compose([*words, f"{_POOL_MAP}=[[lastCLS,[Identity,[]]],[concatPOOL2,[Identity,[]]]]",
              "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[48,10]}],[mlp,{dims:[96,10]}]]"], data_root, monkeypatch)
    _compose([*words, "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[48,32]}],[mlp,{dims:[32,10]}]]"], data_root, monkeypatch)


def test_a_checkpoint_trunk_tensor_in_skip_layers_may_differ(tmp_path, data_root, monkeypatch):
    """SKIP_LAYERS leaves a tensor at random init: VISSL neither copies nor checks it."""
    checkpoint = _ssl_checkpoint(tmp_path / "ssl.torch", {}, embed_dim=64)
    words = [f"config={SEMI_SUPERVISED}", *VISSL_TINY, "config.OPTIMIZER.param_schedulers.lr.milestones=[1]",
             f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}"]
    config = _compose([*words, "config.MODEL.WEIGHTS_INIT.SKIP_LAYERS=[heads,trunk]"], data_root, monkeypatch)
    assert config.MODEL.WEIGHTS_INIT.SKIP_LAYERS == ["heads", "trunk"]


def test_a_params_file_not_in_vissl_layout_is_refused_in_one_line(tmp_path, data_root, monkeypatch):
    """A bare state dict (timm's, or torch.save(model.state_dict())): VISSL would fail on the node looking for
    base_model."""
    from convit_ssl.models import create_trunk

    checkpoint = tmp_path / "bare.pth"
    torch.save(create_trunk("convit_tiny", **VISSL_TINY_TRUNK).state_dict(), checkpoint)
    with pytest.raises(UsageError, match=re.escape(
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE {checkpoint} is not a VISSL checkpoint (no classy_state_dict/"
            f"base_model/model/trunk tensors inside): pass a VISSL run's checkpoint, or start from this file with "
            f"`convit-ssl finetune --checkpoint {checkpoint}`, which also reads timm and official ConViT files")
    ) as error:
        _compose([f"config={SEMI_SUPERVISED}", *VISSL_TINY, *_HEADS_SKIPPED,
                  f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}"], data_root, monkeypatch)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("heads, words", [
    ({"0.clf.0.weight": torch.zeros(128, 48)}, ["config.MODEL.WEIGHTS_INIT.SKIP_LAYERS=[num_batches_tracked,heads]"]),
    ({"0.clf.0.weight": torch.zeros(10, 48), "0.clf.0.bias": torch.zeros(10)}, []),  # a classifier's: loaded
    ({"0.projection.weight": torch.zeros(128, 48)}, []),  # no head tensor of the model's names: none loaded
], ids=["skipped", "same-shapes", "other-names"])
def test_a_checkpoint_whose_heads_vissl_can_load_or_skips_composes(tmp_path, data_root, monkeypatch, heads, words):
    checkpoint = _ssl_checkpoint(tmp_path / "ssl.torch", heads)
    config = _compose([f"config={SEMI_SUPERVISED}", *VISSL_TINY, "config.OPTIMIZER.param_schedulers.lr.milestones=[1]",
                       f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}", *words], data_root, monkeypatch)
    assert config.MODEL.WEIGHTS_INIT.PARAMS_FILE == str(checkpoint)


@pytest.mark.slow
def test_every_recipe_composes_and_heads_follow_the_data_file(data_root, monkeypatch):
    """Each recipe on digits (the one dataset every test machine has): a 10-way head; the data files' class counts."""
    import yaml

    from convit_ssl.engine import PACKAGE_CONFIGS
    from convit_ssl.evaluation.finetune import head_classes, recipe_names

    for name in recipe_names():
        config = _compose([f"config=convit_ssl/benchmark/finetune/{name}", "data=digits"], data_root, monkeypatch)
        assert head_classes(config) == 10, name
        assert config.OPTIMIZER.non_regularized_parameters == ["pos_embedding", "class_token", "gating"]
    folder = PACKAGE_CONFIGS / "config" / "convit_ssl" / "data"
    classes = {name: yaml.safe_load((folder / f"{name}.yaml").read_text())["config"]["CONVIT_SSL"]["NUM_CLASSES"]
               for name in ("imagenet1k", "cifar10", "cifar100", "digits")}
    assert classes == {"imagenet1k": 1000, "cifar10": 10, "cifar100": 100, "digits": 10}


# ---------------------------------------------------------------------------------------------------------------
# Real runs through VISSL's engine
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def train_env(data_root):
    """Environment of `convit-ssl` subprocesses: the data root, one thread per process."""
    return dict(os.environ, CONVIT_SSL_DATA=str(data_root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


TINY = ["trunk.embed_dim=32", "trunk.depth=2", "trunk.local_up_to_layer=1", "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1"]


def _run(args, env):
    result = subprocess.run([sys.executable, "-m", "convit_ssl", "finetune", *args], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "stdout.json").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_finetune_learns_writes_its_result_and_resumes_into_the_same_run(tmp_path, train_env):
    """From random init on all digits labels, 5 epochs: the loss falls and test accuracy ends above chance (10%;
    17% on 360 images is 4.4 binomial standard deviations above it); a run cut after epoch 3 and resumed ends with
    the same epoch 4 as the uninterrupted run."""
    run_dir = tmp_path / "run"
    args = ["--checkpoint", "random", "--recipe", "digits", *TINY, "config.OPTIMIZER.num_epochs=5",
            f"run_dir={run_dir}", "--out", str(tmp_path / "eval")]
    _run(args, train_env)
    losses = _losses(run_dir)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    records = [json.loads(line) for line in (run_dir / "finetune_eval.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [0, 1, 2, 3, 4]
    assert records[-1]["test_images"] == 360 and records[-1]["heldout_images"] == 145
    assert records[-1]["test_top1"] > 17
    (result_file,) = (tmp_path / "eval").glob("finetune-digits-100.json")
    result = json.loads(result_file.read_text())
    assert result["manifest"]["label_subset"]["labels"] == "100%"
    assert result["label_subset"]["train_images"] + result["label_subset"]["heldout_images"] == 1437
    assert {row["selected_on"] for row in result["rows"]} == {"final", "heldout"}
    final = next(row for row in result["rows"] if row["selected_on"] == "final")
    assert final["top1"] == records[-1]["test_top1"]

    # the same run killed after epoch 3's checkpoint: resume from it
    (run_dir / "model_final_checkpoint_phase4.torch").unlink()
    (run_dir / "checkpoint.torch").unlink()
    (run_dir / "checkpoint.torch").symlink_to("model_phase3.torch")
    _run(args, train_env)
    resumed = [json.loads(line) for line in (run_dir / "finetune_eval.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in resumed] == [0, 1, 2, 3, 4]
    assert resumed[4] == records[4]


@pytest.mark.slow
def test_finetune_from_a_pretraining_run_folder_starts_from_its_trunk(tmp_path, train_env):
    """A 1-epoch SimCLR run of a width-32 trunk: fine-tuning takes its shape from the run's config (regularisers
    from the recipe) and its initial weights from the run's checkpoint, which VISSL loads into every trunk layer."""
    from tiny_training import run, train_command

    pretrain = tmp_path / "pretrain"
    run(train_command(pretrain, "config.OPTIMIZER.num_epochs=1"), train_env)
    run_dir = tmp_path / "finetune"
    _run(["--checkpoint", str(pretrain), "--recipe", "digits", "--labels", "10-per-class",
          "config.DATA.NUM_DATALOADER_WORKERS=0", "config.OPTIMIZER.num_epochs=1", f"run_dir={run_dir}"], train_env)
    config = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    overrides = config["MODEL"]["TRUNK"]["CONVIT_SSL"]["OVERRIDES"]
    assert (overrides["embed_dim"], overrides["depth"], overrides["local_up_to_layer"]) == (32, 2, 1)
    assert overrides["drop_path_rate"] == 0.1  # the recipe's, not the pretraining's
    initial = torch.load(config["MODEL"]["WEIGHTS_INIT"]["PARAMS_FILE"], weights_only=True)
    pretrained = torch.load(pretrain / "checkpoint.torch", weights_only=True)
    trunk = initial["classy_state_dict"]["base_model"]["model"]["trunk"]
    source = pretrained["classy_state_dict"]["base_model"]["model"]["trunk"]
    assert trunk.keys() == source.keys()
    for key in trunk:
        torch.testing.assert_close(trunk[key], source[key], rtol=0, atol=0)
    log = (run_dir / "log.txt").read_text()
    assert {f"trunk.{key}" for key in trunk} == set(re.findall(r"Loaded: (trunk\.\S+)\s+of shape", log))


def test_randaugment_posterize_at_the_top_level_gives_a_black_image_as_before_pil_10():
    """VISSL's increasing posterize keeps 0 bits at level 10; PIL 10+ raised ValueError there (a DeiT recipe run
    died in its first epoch)."""
    from PIL import Image
    import convit_ssl.vissl_glue  # noqa: F401 (the patches)
    from vissl.data.ssl_transforms.rand_auto_aug import AugmentOp

    image = Image.new("RGB", (8, 8), (200, 120, 40))
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert np.asarray(op(image)).reshape(-1, 3).tolist() == [[0, 0, 0]] * 64
    # level 5 keeps 4 - 2 = 2 bits: 200, 120, 40 -> 192, 64, 0
    posterized = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(image)
    assert np.asarray(posterized).reshape(-1, 3).tolist() == [[192, 64, 0]] * 64


@pytest.mark.slow
@pytest.mark.parametrize("config_name, words", [
    # semi-supervised: a file list of 2 images per class (its 1% / 10% lists are such lists); its multistep schedule
    # drops the lr after epoch 1 of 2 instead of 30 of 70
    (SEMI_SUPERVISED, ["config.DATA.TRAIN.COPY_TO_LOCAL_DISK=False",
                       "config.OPTIMIZER.param_schedulers.lr.milestones=[1]"]),
    # fulltune: the whole training split cut to 20 images
    (FULLTUNE, ["config.DATA.TRAIN.DATA_LIMIT=20"]),
], ids=["semi_supervised", "fulltune"])
def test_vissls_own_finetuning_configs_train_our_trunk(tmp_path, data_root, train_env, config_name, words):
    """Two epochs of 2 steps of 10 images through `convit-ssl train`: the trunk VISSL builds is the one the ViT/ConViT
    keys describe, every trunk tensor starts from the checkpoint (an SSL run's layout, its projection head of
    another shape not loaded), the loss is finite and the test split is scored each epoch."""
    from tiny_training import run

    from convit_ssl.trunk_config import trunk_kwargs

    checkpoint = _ssl_checkpoint(tmp_path / "pretrained.torch", {"0.clf.0.weight": torch.zeros(128, 48)})
    if config_name == SEMI_SUPERVISED:
        train = data_root / "digits" / "train"
        files = [sorted(folder.iterdir())[:2] for folder in sorted(train.iterdir())]
        np.save(tmp_path / "images.npy", np.array([str(file) for pair in files for file in pair]))
        np.save(tmp_path / "labels.npy", np.repeat(np.arange(10), 2))
        words = [*words, "config.DATA.TRAIN.DATA_SOURCES=[disk_filelist]",
                 "config.DATA.TRAIN.LABEL_SOURCES=[disk_filelist]",
                 f"config.DATA.TRAIN.DATA_PATHS=[{tmp_path / 'images.npy'}]",
                 f"config.DATA.TRAIN.LABEL_PATHS=[{tmp_path / 'labels.npy'}]"]
    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "convit_ssl", "train", f"config={config_name}", *VISSL_TINY, *words,
         f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}", "config.MODEL.WEIGHTS_INIT.SKIP_LAYERS=[heads]",
         f"run_dir={run_dir}"], train_env)
    losses = _losses(run_dir)
    assert len(losses) == 4 and np.isfinite(losses).all()
    config = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    assert {key: trunk_kwargs(config["MODEL"])[key] for key in VISSL_TINY_TRUNK} == VISSL_TINY_TRUNK
    trunk = torch.load(checkpoint, weights_only=True)["classy_state_dict"]["base_model"]["model"]["trunk"]
    log = (run_dir / "log.txt").read_text()
    assert {f"trunk.{key}" for key in trunk} == set(re.findall(r"Loaded: (trunk\.\S+)\s+of shape", log))
    assert not re.findall(r"Loaded: heads", log)
    scored = [json.loads(line) for line in (run_dir / "metrics.json").read_text().splitlines()]
    meters = [key for record in scored for key in record if key.endswith("_accuracy_list_meter")]
    assert meters == ["train_accuracy_list_meter", "test_accuracy_list_meter"] * 2


@pytest.mark.slow
def test_the_deit_recipe_with_layer_decay_trains_through_vissl(tmp_path, train_env):
    """The ImageNet recipe's pieces (RandAugment, random erasing, mixup/cutmix targets, stochastic depth) with layer
    decay 0.75, on digits at 32 px (the CIFAR recipe), one epoch: VISSL's TensorBoard hook logs the schedule's lr
    (the groups' lrs differ: classy's list made it fail) and the hook scores the epoch."""
    run_dir = tmp_path / "run"
    _run(["--checkpoint", "random", "--recipe", "cifar10", "--labels", "20%", "data=digits", "model=convit_tiny",
          *TINY, "config.OPTIMIZER.num_epochs=1", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32",
          "config.OPTIMIZER.layer_decay=0.75", f"run_dir={run_dir}"], train_env)
    (record,) = [json.loads(line) for line in (run_dir / "finetune_eval.jsonl").read_text().splitlines()]
    assert record["epoch"] == 0 and record["test_images"] == 360
    rates = re.findall(r"lr: \[([^\]]+)\]", (run_dir / "log.txt").read_text())
    factors = [float(value) / float(rates[-1].split(",")[-1]) for value in rates[-1].split(",")]
    assert factors == pytest.approx([0.75 ** 3, 0.75 ** 2, 0.75, 1.0])  # depth 2: embeddings, blocks 0, 1, rest


def test_a_resume_drops_the_evaluations_of_the_epochs_after_the_checkpoint(tmp_path):
    """The killed run scored epochs 0, 1 and 2 and half of 3; it resumes from a checkpoint within epoch 2 (epochs 0
    and 1 complete): epoch 2 is scored again, so its line goes."""
    from types import SimpleNamespace

    from convit_ssl.finetune_hook import EVAL_FILE, FinetuneEvaluationHook
    from convit_ssl.hooks import ResumePoint, resumed_checkpoint

    lines = [json.dumps({"epoch": epoch, "test_top1": 10.0 * epoch}) + "\n" for epoch in (0, 1, 2)]
    (tmp_path / EVAL_FILE).write_text("".join(lines) + '{"epoch": 3, "te')
    task = SimpleNamespace(checkpoint={"iteration": 25, "train_phase_idx": 1}, checkpoint_folder=str(tmp_path))
    assert resumed_checkpoint(task) == ResumePoint(iteration=25, last_epoch=1)
    FinetuneEvaluationHook(config={}).on_start(task)
    assert (tmp_path / EVAL_FILE).read_text() == "".join(lines[:2])
    assert resumed_checkpoint(SimpleNamespace(checkpoint=None)) is None  # a fresh run


def test_a_fresh_run_drops_the_evaluations_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    """The killed run scored epoch 0 and left no checkpoint: the run starts over, and its scores alone make the file
    (else a shorter new run keeps the dead run's later epochs, and the best held-out epoch may be one of them)."""
    from types import SimpleNamespace

    from convit_ssl.finetune_hook import EVAL_FILE, FinetuneEvaluationHook

    (tmp_path / EVAL_FILE).write_text(json.dumps({"epoch": 0, "test_top1": 50.0}) + "\n")
    FinetuneEvaluationHook(config={}).on_start(SimpleNamespace(checkpoint=None, checkpoint_folder=str(tmp_path)))
    assert (tmp_path / EVAL_FILE).read_text() == ""


def test_the_evaluation_hook_counts_images_and_top1_top5_hits_by_hand():
    from convit_ssl.finetune_hook import _hits

    scores = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 1: first, a top-1 hit
                           [0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.0],  # label 4: fourth, a top-5 hit only
                           [0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.0]])  # label 1: sixth, no hit
    labels = torch.tensor([1, 4, 1])
    batches = [(scores[:2], labels[:2]), (scores[2:], labels[2:])]
    counts = _hits(lambda images: [images], batches, torch.device("cpu"))  # the "model" passes its input on
    assert counts.tolist() == [3.0, 1.0, 2.0]
