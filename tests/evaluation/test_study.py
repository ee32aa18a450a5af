"""Low-data study end to end on digits with tiny twin trunks: files, table, plot, nested subsets, kNN, two inits."""
import csv
import json

import pytest
from PIL import Image

from convit_ssl.evaluation.features import state_digest
from convit_ssl.evaluation.results import format_value, gather
from convit_ssl.evaluation.study import StudyModel, low_data_study, random_twins, relative_gain, twin_models

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, local_up_to_layer=2)
FRACTIONS = [0.05, 0.3, 1.0]


def as_checkpoints(models):
    """The same trunks described as checkpoints (the study's other init)."""
    return [StudyModel(model.name, model.trunk, {**model.info, "source": "checkpoint"}) for model in models]


@pytest.mark.slow
def test_low_data_study_writes_consistent_files(digits_data, quick_recipe, tmp_path):
    """Two pairs in one study (stand-ins for SSL checkpoints, and random init of their shapes): a row per pair and
    fraction, each number the one of its probe file."""
    checkpoints = as_checkpoints(twin_models("convit_tiny", seed=1, **TINY))
    models = [*checkpoints, *random_twins(checkpoints, seed=0)]
    assert [m.trunk.local_up_to_layer for m in models] == [2, 0, 2, 0]
    assert models[3].info["options"]["local_up_to_layer"] == 0
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
    assert [(row["init"], row["fraction"]) for row in study["table"]] == [
        (init, fraction) for init in ("checkpoint", "random") for fraction in FRACTIONS]
    assert study["models"] == ["ConViT checkpoint", "DeiT checkpoint", "ConViT random", "DeiT random"]
    for row, line, csv_row in zip(study["table"], lines[2:], csv_rows, strict=True):
        fraction = row["fraction"]
        probes = {name: json.loads((tmp_path / f"probe-{name}-{row['init']}-f{fraction:g}.json").read_text())
                  for name in ("ConViT", "DeiT")}
        assert csv_row["init"] == row["init"] and line.startswith(f"| {fraction:g} | {row['init']} | ")
        for name, probe in probes.items():
            model = probe["manifest"]["models"][0]
            assert model["name"] == name and model["source"] == row["init"] and probe["trunk"]["unchanged"]
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
    assert images == [69, 425, 1437] * 2  # floor(f * n) of each class of 142-146 images (139 for one)
    by_init = {init: [row["top1 ConViT"] for row in study["table"] if row["init"] == init]
               for init in ("checkpoint", "random")}
    assert by_init["checkpoint"] != by_init["random"]  # two different trunks, not one table twice

    rows = gather([tmp_path])
    assert len(rows) == 4 * len(FRACTIONS) and {row["kind"] for row in rows} == {"low_data_probe"}
    assert {row["model"] for row in rows} == set(study["models"])


@pytest.mark.slow
def test_finetune_runs_every_trunk_on_every_subset_with_scaled_epochs(digits_data, quick_recipe, tmp_path):
    """``finetune_epochs``: each trunk fine-tuned through VISSL's engine on each subset for EPOCHS / f epochs, its
    row the test top-1 of the epoch best on held-out images, the probed trunks unchanged."""
    from convit_ssl.evaluation.finetune import scaled_epochs

    assert [scaled_epochs(30, f) for f in (0.05, 0.1, 0.3, 0.5, 1.0)] == [600, 300, 100, 60, 30]  # same images seen
    models = twin_models("convit_tiny", seed=0, **TINY)
    digests = [state_digest(model.trunk) for model in models]
    recipe = quick_recipe.replace(lrs=[0.3], wds=[0.0], features=["lastCLS"], epochs=2, batch_size=128)
    study = low_data_study(models, recipe, tmp_path, fractions=[0.5], finetune_epochs=1,
                           finetune_words=["config.DATA.NUM_DATALOADER_WORKERS=0"])
    (row,) = study["table"]
    for name in ("ConViT", "DeiT"):
        run_dir = tmp_path / "finetune" / f"{name}-random-f0.5"
        records = [json.loads(line) for line in (run_dir / "finetune_eval.jsonl").read_text().splitlines()]
        assert [record["epoch"] for record in records] == [0, 1]  # 1 / 0.5 epochs
        best = max(records, key=lambda record: (record["heldout_top1"], -record["epoch"]))
        assert row[f"finetune top1 {name}"] == best["test_top1"]
        hits = best["test_top1"] * 360 / 100  # a share of digits' 360 test images: a whole count
        assert hits == pytest.approx(round(hits), abs=1e-9)
    assert row["finetune gain top1 (%)"] == relative_gain(row["finetune top1 ConViT"], row["finetune top1 DeiT"])
    assert [state_digest(model.trunk) for model in models] == digests  # fine-tuned from saved copies
    kinds = {row["kind"] for row in gather([tmp_path])}
    assert kinds == {"low_data_probe", "finetune"}
    with pytest.raises(ValueError, match="the 'random' rule"):
        low_data_study(models, recipe, tmp_path, finetune_epochs=1, subset_rule="first")


def test_knn_with_every_k_above_a_subset_skips_them_all(digits_data, quick_recipe, tmp_path):
    # 5% of digits keeps 69 images: k = 100 is skipped at 0.05, as documented, not an error after the probes
    models = twin_models("convit_tiny", **TINY)
    recipe = quick_recipe.replace(epochs=1, lrs=[0.3], wds=[0.0], features=["lastCLS"])
    study = low_data_study(models, recipe, tmp_path, fractions=[0.05, 1.0], knn_ks=[100])
    small = json.loads((tmp_path / "probe-ConViT-random-f0.05.json").read_text())["knn"]
    assert small["skipped_ks"] == [100] and small["accuracy"] == {}
    full = json.loads((tmp_path / "probe-ConViT-random-f1.json").read_text())["knn"]
    assert full["skipped_ks"] == [] and set(full["accuracy"]) == {"100"}
    assert "knn100 top1 ConViT" not in study["table"][0] and "knn100 top1 ConViT" in study["table"][1]


def test_relative_gain_matches_the_paper():
    assert round(relative_gain(47.8, 34.8)) == 37  # ConViT-S vs DeiT-S at 5% of ImageNet, Table 2
    assert relative_gain(1.0, 0.0) is None


def test_random_twins_have_the_shapes_and_the_seed_init():
    """Random init of a pair's shapes, same seed: exactly the trunks ``twin_models`` builds from the preset."""
    random_pair = twin_models("convit_tiny", seed=0, **TINY)
    checkpoints = as_checkpoints(twin_models("convit_tiny", seed=3, **TINY))
    twins = random_twins(checkpoints, "convit_tiny", seed=0)
    assert [twin.name for twin in twins] == ["ConViT", "DeiT"] and [twin.init for twin in twins] == ["random"] * 2
    assert [state_digest(twin.trunk) for twin in twins] == [state_digest(model.trunk) for model in random_pair]
    assert state_digest(twins[0].trunk) != state_digest(checkpoints[0].trunk)
    assert [twin.info["options"]["local_up_to_layer"] for twin in twins] == [2, 0]


def test_study_needs_pairs_of_one_init_each_and_cached_features(quick_recipe, tmp_path):
    models = twin_models("convit_tiny", **TINY)
    with pytest.raises(ValueError, match="compares pairs of models"):
        low_data_study(models[:1], quick_recipe, tmp_path)
    with pytest.raises(ValueError, match="differ in init, got ConViT random, DeiT random, ConViT random, DeiT random"):
        low_data_study([*models, *models], quick_recipe, tmp_path)
    with pytest.raises(ValueError, match="share the names ConViT and DeiT"):
        low_data_study([*models, *as_checkpoints(twin_models("convit_tiny", names=("A", "B"), **TINY))],
                       quick_recipe, tmp_path)
    with pytest.raises(ValueError, match="differ in init, got ConViT random, DeiT checkpoint"):
        low_data_study([models[0], *as_checkpoints(models[1:])], quick_recipe, tmp_path)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="pass --no-stream"):
        low_data_study(models, quick_recipe.replace(stream=True), tmp_path)
