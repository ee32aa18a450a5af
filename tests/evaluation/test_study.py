"""Low-data study end to end on digits with tiny twin trunks: files, table, plot, nested subsets, kNN."""
import csv
import json
import math

import pytest
from PIL import Image

from convit_ssl.evaluation.features import state_digest
from convit_ssl.evaluation.results import format_value, gather
from convit_ssl.evaluation.scratch import scaled_epochs
from convit_ssl.evaluation.study import low_data_study, relative_gain, twin_models

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, local_up_to_layer=2)
FRACTIONS = [0.05, 0.3, 1.0]


@pytest.mark.slow
def test_low_data_study_writes_consistent_files(digits_data, quick_recipe, tmp_path):
    models = twin_models("convit_tiny", seed=0, **TINY)
    assert [m.trunk.local_up_to_layer for m in models] == [2, 0] and models[1].info["options"]["local_up_to_layer"] == 0
    recipe = quick_recipe.replace(lrs=[0.3], wds=[0.0], features=["lastCLS+lastPOOL"])
    study = low_data_study(models, recipe, tmp_path, fractions=FRACTIONS, seed=0, knn_ks=[1, 5, 100],
                           args={"note": "test"})

    png = tmp_path / "low_data.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size == (720, 480) and image.format == "PNG"

    on_disk = json.loads((tmp_path / "study.json").read_text())
    assert on_disk["table"] == study["table"] and sorted(on_disk["files"]) == sorted(study["files"])
    lines = (tmp_path / "study.md").read_text().splitlines()
    with open(tmp_path / "study.csv") as stream:
        csv_rows = list(csv.DictReader(stream))
    images = []
    for row, line, csv_row in zip(study["table"], lines[2:], csv_rows):
        fraction = row["fraction"]
        probes = {name: json.loads((tmp_path / f"probe-{name}-f{fraction:g}.json").read_text())
                  for name in ("ConViT", "DeiT")}
        for name, probe in probes.items():
            assert probe["manifest"]["models"][0]["name"] == name and probe["trunk"]["unchanged"]
            assert row[f"top1 {name}"] == probe["chosen"]["test_top1"] == probe["rows"][0]["top1"]
            assert row[f"top5 {name}"] == probe["chosen"]["test_top5"]
            assert float(csv_row[f"top1 {name}"]) == probe["chosen"]["test_top1"]
            assert format_value(f"top1 {name}", probe["chosen"]["test_top1"]) in line.split(" | ")
        convit, deit = (probes[name]["chosen"]["test_top1"] for name in ("ConViT", "DeiT"))
        assert row["gain top1 (%)"] == pytest.approx(100 * (convit - deit) / deit)
        assert probes["ConViT"]["dataset"]["train"] == probes["DeiT"]["dataset"]["train"]  # same labelled images
        images.append(row["train images"])
        knn = probes["ConViT"]["knn"]
        if fraction == 0.05:  # 69 labelled images: k = 100 is skipped and said so
            assert knn["skipped_ks"] == [100] and set(knn["accuracy"]) == {"1", "5"}
        assert knn["accuracy"]["1"]["top1"] == knn["accuracy"]["1"]["top5"]  # one neighbour: top-5 is top-1
        assert row["knn1 top1 ConViT"] == knn["accuracy"]["1"]["top1"]
    assert images == [69, 425, 1437]  # floor(f * n) of each class of 142-146 images (139 for one)

    rows = gather([tmp_path])
    assert len(rows) == 2 * len(FRACTIONS) and {row["kind"] for row in rows} == {"low_data_probe"}


@pytest.mark.slow
def test_training_from_scratch_copies_the_trunks_and_scales_epochs(digits_data, quick_recipe, tmp_path):
    assert [scaled_epochs(30, f) for f in (0.05, 0.1, 0.3, 0.5, 1.0)] == [600, 300, 100, 60, 30]  # same images seen
    models = twin_models("convit_tiny", seed=0, **TINY)
    digests = [state_digest(model.trunk) for model in models]
    recipe = quick_recipe.replace(lrs=[0.3], wds=[0.0], features=["lastCLS"], epochs=2, batch_size=128)
    study = low_data_study(models, recipe, tmp_path, fractions=[0.5], scratch_epochs=1)
    (row,) = study["table"]
    for name in ("ConViT", "DeiT"):
        scratch = json.loads((tmp_path / f"scratch-{name}-f0.5.json").read_text())
        result = scratch["result"]
        assert (result["epochs"], result["train_images"], result["steps"]) == (2, 716, 2 * 6)  # 716 / 128 -> 6 batches
        # scores over digits' 360 test images: whole counts of images, in percent
        hits = [result[key] * 360 / 100 for key in ("top1", "top5")]
        assert hits == pytest.approx([round(count) for count in hits], abs=1e-9) and hits[0] <= hits[1] <= 360
        assert math.isfinite(result["final_train_loss"])
        assert row[f"scratch top1 {name}"] == result["top1"] == scratch["rows"][0]["top1"]
    assert row["scratch gain top1 (%)"] == relative_gain(row["scratch top1 ConViT"], row["scratch top1 DeiT"])
    assert [state_digest(model.trunk) for model in models] == digests  # copies were trained, not the probed trunks
    models[0].info["source"] = "checkpoint"
    with pytest.raises(ValueError, match="training from scratch needs random-init models"):
        low_data_study(models, recipe, tmp_path, scratch_epochs=1)


def test_train_supervised_follows_its_protocol_and_scores_like_sklearn(digits_data, quick_recipe, monkeypatch):
    """The schedule and weight-decay groups of ``train_supervised`` against its protocol written out by hand, and
    its top-1/top-5 against scikit-learn's top_k_accuracy_score on the trained trunk and head."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.optim.optimizer as optim_hooks
    from sklearn.metrics import top_k_accuracy_score
    from torch.utils.data import DataLoader

    from convit_ssl.evaluation import scratch
    from convit_ssl.evaluation.features import image_folder

    heads, steps = [], []

    class RecordedLinear(nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            heads.append(self)

    monkeypatch.setattr(scratch, "nn", type("nn", (), {"Linear": RecordedLinear, "init": nn.init, "Module": nn.Module}))
    handle = optim_hooks.register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: steps.append((optimizer, [group["lr"] for group in optimizer.param_groups])))
    trunk = twin_models("convit_tiny", seed=0, **TINY)[0].trunk
    recipe = quick_recipe.replace(batch_size=32)
    train_images = len(image_folder("digits", "train").samples)
    indices = np.random.default_rng(0).permutation(train_images)[:96]
    try:
        result = scratch.train_supervised(trunk, "digits", recipe, indices, epochs=5, seed=0)
    finally:
        handle.remove()

    # AdamW at 5e-4 x 32 / 512, warm-up over max(1, 5% of 15 steps) = 1 step, then cosine to 0
    assert (result["epochs"], result["steps"], result["batch_size"], result["train_images"]) == (5, 15, 32, 96)
    optimizer = steps[0][0]
    assert len(steps) == 15 and all(o is optimizer for o, _ in steps)
    assert isinstance(optimizer, torch.optim.AdamW)
    base = 5e-4 * 32 / 512
    expected = [base] + [base * 0.5 * (1 + math.cos(math.pi * (step - 1) / 14)) for step in range(1, 15)]
    assert [lrs[0] for _, lrs in steps] == pytest.approx(expected, rel=1e-12)
    assert all(len(set(lrs)) == 1 for _, lrs in steps)  # every group on one schedule
    # weight decay 0.05 except biases, norms, the position embedding and the class token
    (head,) = heads
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.05 for p in group["params"]}
    undecayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.0 for p in group["params"]}
    assert id(head.weight) in decayed and id(trunk.blocks[0].attn.qk.weight) in decayed
    for parameter in (head.bias, trunk.pos_embedding, trunk.class_token, trunk.norm.weight, trunk.blocks[0].norm1.bias):
        assert id(parameter) in undecayed
    assert len(decayed | undecayed) == sum(1 for _ in trunk.parameters()) + 2
    # the scores of the trained trunk and head on the test split, computed independently
    test_set = image_folder("digits", "val", recipe.preprocess.eval_transform())
    trunk.eval()
    with torch.no_grad():
        logits, labels = zip(*[(head(trunk(images, out_feat_keys=["lastCLS"])[0]), targets)
                               for images, targets in DataLoader(test_set, batch_size=64)])
    logits, labels = torch.cat(logits).numpy(), torch.cat(labels).numpy()
    for k in (1, 5):
        oracle = 100 * top_k_accuracy_score(labels, logits, k=k, labels=list(range(10)))
        assert result[f"top{k}"] == pytest.approx(oracle, abs=1e-9), k


def test_relative_gain_matches_the_paper():
    assert round(relative_gain(47.8, 34.8)) == 37  # ConViT-S vs DeiT-S at 5% of ImageNet, Table 2
    assert relative_gain(1.0, 0.0) is None


def test_study_needs_two_models_and_cached_features(quick_recipe, tmp_path):
    models = twin_models("convit_tiny", **TINY)
    with pytest.raises(ValueError, match="compares two models"):
        low_data_study(models[:1], quick_recipe, tmp_path)
    with pytest.raises(ValueError, match="pass --no-stream"):
        low_data_study(models, quick_recipe.replace(stream=True), tmp_path)
