"""Linear-probe grid on digits with a tiny random trunk: selection, frozen trunk, eval mode, SGD semantics, recipes."""
import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from convit_ssl.evaluation.features import state_digest
from convit_ssl.evaluation.linear_probe import HeadGrid, load_recipe, linear_probe, recipe_names, train_heads
from convit_ssl.evaluation.subsets import class_subset, heldout_split
from convit_ssl.models import create_trunk


def record_modes(trunk):
    """Forward pre-hook noting (training, grad enabled) at every trunk call."""
    calls = []
    trunk.register_forward_pre_hook(lambda module, inputs: calls.append((module.training, torch.is_grad_enabled())))
    return calls


def test_grid_selects_best_heldout_head_and_leaves_trunk_alone(digits_data, make_trunk, quick_recipe):
    trunk = make_trunk()
    trunk.train()  # the probe must switch to eval mode itself, and switch back
    before = copy.deepcopy(trunk.state_dict())
    calls = record_modes(trunk)
    result = linear_probe(trunk, quick_recipe, model={"name": "tiny"})

    grid = result["grid"]
    assert len(grid) == 2 * 2 * 2
    heldout = [entry["heldout_top1"] for entry in grid]
    chosen = result["chosen"]
    assert chosen["selected_on"] == "heldout"
    assert chosen["index"] == heldout.index(max(heldout))  # best held-out top-1, first on ties
    assert grid[chosen["index"]]["test_top1"] == chosen["test_top1"] == result["rows"][0]["top1"]
    assert all(0 <= entry[key] <= 100 for entry in grid for key in ("test_top1", "test_top5", "heldout_top1"))
    assert chosen["test_top1"] > 50  # 10 classes: chance is 10%; a random tiny trunk gets about 75%

    assert calls and all(training is False and grad is False for training, grad in calls)
    assert trunk.training  # mode restored
    assert all(torch.equal(before[key], value) for key, value in trunk.state_dict().items())
    assert result["trunk"]["unchanged"] and result["trunk"]["sha256_before"] == state_digest(trunk)
    assert result["trunk"]["feature_sizes"] == {"lastCLS": 48, "lastCLS+lastPOOL": 96}

    # digits training classes hold 142, 146, 142, 146, 145, 145, 145, 143, 139, 144 images; 10% of each, rounded
    # half up, is held out: 14 + 15 + 14 + 15 + 15 + 15 + 15 + 14 + 14 + 14 = 145
    assert (result["dataset"]["train"], result["dataset"]["heldout"], result["dataset"]["test"]) == (1292, 145, 360)


def test_label_fraction_and_fallback_to_training_accuracy(digits_data, make_trunk, quick_recipe):
    trunk = make_trunk()
    result = linear_probe(trunk, quick_recipe, fraction=0.05, seed=1)
    from convit_ssl.evaluation.features import image_folder

    targets = np.asarray(image_folder("digits", "train").targets)
    pool = class_subset(targets, 0.05, seed=1)
    fit, heldout = heldout_split(targets, 0.1, seed=1, indices=pool)
    # 5% of each class, floored: 7 images per class except 6 for the class of 139; one of each held out
    assert (result["dataset"]["train"], result["dataset"]["heldout"]) == (len(fit), len(heldout)) == (59, 10)

    tiny = linear_probe(trunk, quick_recipe, fraction=0.01)  # one image per class: nothing to hold out
    assert tiny["dataset"]["heldout"] == 0 and tiny["dataset"]["train"] == 10
    assert tiny["chosen"]["selected_on"] == "train (no held-out images)"
    train_top1 = [entry["train_top1"] for entry in tiny["grid"]]
    assert tiny["chosen"]["index"] == train_top1.index(max(train_top1))


@pytest.mark.slow
def test_streamed_probe_runs_the_trunk_in_eval_mode(digits_data, make_trunk, quick_recipe):
    trunk = make_trunk()
    calls = record_modes(trunk)
    # crops of the whole image: the augmentation is a no-op, so the heads learn as fast as on cached features
    recipe = quick_recipe.replace(stream=True, epochs=4, lrs=[1.0], wds=[0.0], features=["lastCLS+lastPOOL"],
                                  crop_scale=[1.0, 1.0], stats_samples=300)
    result = linear_probe(trunk, recipe)
    assert calls and all(training is False and grad is False for training, grad in calls)
    assert result["chosen"]["selected_on"] == "single head" and result["trunk"]["unchanged"]
    assert result["dataset"]["train"] == 1292 and result["chosen"]["test_top1"] > 40
    with pytest.raises(ValueError, match="streamed probe chooses its head on held-out images"):
        linear_probe(trunk, recipe.replace(heldout_fraction=0.0))


def test_head_grid_is_torch_sgd_per_head():
    torch.manual_seed(0)
    x, y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    mean, std = x.mean(0), x.std(0, unbiased=False)
    lrs, wds = [0.5, 0.05, 0.2], [0.01, 0.0, 0.1]
    grid = HeadGrid(12, 5, lrs, wds, mean, std, seed=3)
    steps = 6
    train_heads({"f": grid}, lambda epoch: [({"f": x[i::2]}, y[i::2]) for i in range(2)], epochs=3, steps_per_epoch=2)
    for g, (lr, wd) in enumerate(zip(lrs, wds)):
        head = torch.nn.Linear(12, 5)
        with torch.no_grad():
            head.weight.copy_(HeadGrid(12, 5, [lr], [wd], mean, std, seed=3).weight[0])
            head.bias.zero_()
        optimizer = torch.optim.SGD([{"params": [head.weight], "weight_decay": wd},
                                     {"params": [head.bias], "weight_decay": 0.0}], lr=lr, momentum=0.9)
        cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        for step in range(steps):
            batch = step % 2
            loss = torch.nn.functional.cross_entropy(head((x[batch::2] - mean) / std), y[batch::2])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        assert torch.allclose(grid.weight[g], head.weight, atol=1e-5)
        assert torch.allclose(grid.bias[g], head.bias, atol=1e-5)


def test_every_shipped_recipe_loads_and_matches_the_pretraining_normalisation():
    data_configs = Path(__file__).resolve().parents[2] / "configs" / "config" / "convit_ssl" / "data"
    assert {"digits", "cifar10", "cifar100", "imagenet1k", "places205", "inaturalist2018"} <= set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.dataset == name and recipe.image_size % 4 == 0
        assert all(key for choice in recipe.features for key in choice.split("+"))
        # a dataset without a pretraining data file is probed with ImageNet-pretrained trunks
        pretraining = name if (data_configs / f"{name}.yaml").is_file() else "imagenet1k"
        section = yaml.safe_load((data_configs / f"{pretraining}.yaml").read_text())["config"]["CONVIT_SSL"]
        assert list(recipe.mean) == section["MEAN"] and list(recipe.std) == section["STD"], name
    # every default feature choice of a ConViT recipe exists in the paper's layout (2 class-token blocks)
    trunk = create_trunk("convit_tiny", img_size=32, patch_size=16, embed_dim=16, depth=12, num_heads=4)
    for name in recipe_names():
        keys = [key for choice in load_recipe(name).features for key in choice.split("+")]
        trunk(torch.zeros(1, 3, 32, 32), out_feat_keys=keys)


def test_recipe_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'imagenet'; known: cifar10, .*digits"):
        load_recipe("imagenet")
    text = (Path(load_recipe.__globals__["RECIPE_DIR"]) / "digits.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("epochs:", "epoch:"))
    with pytest.raises(ValueError, match="unknown field.s. epoch; missing field.s. epochs; the fields are"):
        load_recipe(str(bad))
    bad.write_text(text.replace("lrs: [0.03, 0.1, 0.3, 1.0]", "lrs: []"))
    with pytest.raises(ValueError, match="lrs is empty"):
        load_recipe(str(bad))


def test_recipes_compose_with_defaults(tmp_path):
    """A recipe is its defaults' fields, in order, then its own; ``normalisation`` names a data file's statistics."""
    import dataclasses

    def differences(a, b):
        return {key for key, value in dataclasses.asdict(a).items() if dataclasses.asdict(b)[key] != value}

    assert differences(load_recipe("cifar100"), load_recipe("cifar10")) == {"dataset", "mean", "std"}
    assert differences(load_recipe("places205"), load_recipe("imagenet1k")) == {"dataset", "epochs"}
    assert load_recipe("places205").epochs == 14 and load_recipe("imagenet1k").epochs == 28
    (tmp_path / "grid.yaml").write_text("lrs: [0.5]\nepochs: 3\n")
    (tmp_path / "mine.yaml").write_text("defaults: [cifar10, grid.yaml, _self_]\nepochs: 7\nnormalisation: imagenet1k\n")
    mine = load_recipe(str(tmp_path / "mine.yaml"))
    assert (mine.dataset, mine.lrs, mine.epochs) == ("cifar10", (0.5,), 7)
    assert mine.mean == (0.485, 0.456, 0.406) and mine.std == (0.229, 0.224, 0.225)
    (tmp_path / "loop.yaml").write_text("defaults: [loop.yaml]\n")
    with pytest.raises(ValueError, match="recipe loop.yaml: its defaults include it again"):
        load_recipe(str(tmp_path / "loop.yaml"))
    (tmp_path / "stats.yaml").write_text("defaults: [digits]\nnormalisation: mnist\n")
    with pytest.raises(ValueError, match="normalisation 'mnist' names no data file; known: cifar10, cifar100"):
        load_recipe(str(tmp_path / "stats.yaml"))


class Killed(Exception):
    """Stands for the job being killed right after a checkpoint."""


@pytest.mark.slow
def test_a_streamed_probe_resumes_after_its_last_epoch_and_ends_as_if_never_stopped(digits_data, make_trunk,
                                                                                  quick_recipe, tmp_path, monkeypatch):
    probe_module = sys.modules["convit_ssl.evaluation.linear_probe"]
    recipe = quick_recipe.replace(stream=True, epochs=2, batch_size=64, stats_samples=200, features=["lastCLS"])
    straight = linear_probe(make_trunk(), recipe, fraction=0.2, state_dir=tmp_path / "straight")
    assert straight["resumed_at_epoch"] == 0 and not list((tmp_path / "straight").iterdir())
    saved = []
    real_save = probe_module.atomic.torch_save

    def save_then_die(state, path):
        real_save(state, path)
        saved.append(state["epochs_done"])
        raise Killed

    monkeypatch.setattr(probe_module.atomic, "torch_save", save_then_die)
    with pytest.raises(Killed):
        linear_probe(make_trunk(), recipe, fraction=0.2, state_dir=tmp_path / "run")
    monkeypatch.setattr(probe_module.atomic, "torch_save", real_save)
    assert saved == [1] and len(list((tmp_path / "run").glob(".probe-state-*.torch"))) == 1
    other = linear_probe(make_trunk(seed=1), recipe, fraction=0.2, state_dir=tmp_path / "run")  # other weights
    assert other["resumed_at_epoch"] == 0 and len(list((tmp_path / "run").iterdir())) == 1  # the first one's stays
    resumed = linear_probe(make_trunk(), recipe, fraction=0.2, state_dir=tmp_path / "run")
    assert resumed["resumed_at_epoch"] == 1
    assert resumed["grid"] == straight["grid"] and resumed["chosen"] == straight["chosen"]  # bit for bit
    assert not list((tmp_path / "run").iterdir())
