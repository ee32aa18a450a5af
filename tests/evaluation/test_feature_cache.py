"""Feature extraction: one pass for several keys, rows in dataset order, the memmap cache and its description."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from convit_ssl.cli import main
from convit_ssl.evaluation.features import (
    Preprocess, check_feature_choices, image_folder, split_features, state_digest, trunk_keys,
)

PREPROCESS = Preprocess(32, 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def count_calls(trunk):
    calls = []
    trunk.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[0]))
    return calls


def test_rows_follow_the_dataset_and_keys_share_one_pass(digits_data, make_trunk):
    trunk = make_trunk()
    calls = count_calls(trunk)
    features = split_features(trunk, "digits", "val", ["lastCLS", "lastPOOL", "blkPOOL0"], PREPROCESS, batch_size=100)
    assert calls == [100, 100, 100, 60]  # 360 test images, one trunk call per batch for all three keys
    images = torch.stack([image_folder("digits", "val", PREPROCESS.eval_transform())[i][0] for i in (0, 1, 359)])
    with torch.no_grad():
        cls, block0 = trunk.eval()(images, out_feat_keys=["lastCLS", "blkPOOL0"])
    assert np.allclose(features.arrays["lastCLS"][[0, 1, 359]], cls.numpy(), atol=1e-5)
    assert np.allclose(features.arrays["blkPOOL0"][[0, 1, 359]], block0.numpy(), atol=1e-5)
    joined = features.choice("lastCLS+lastPOOL", np.array([3, 5]))
    assert np.array_equal(joined, np.hstack([features.arrays["lastCLS"][[3, 5]], features.arrays["lastPOOL"][[3, 5]]]))
    assert features.labels.tolist() == image_folder("digits", "val").targets and len(features.files) == 360


def test_cache_is_reused_and_extended_key_by_key(digits_data, make_trunk, tmp_path):
    trunk = make_trunk()
    calls = count_calls(trunk)
    first = split_features(trunk, "digits", "val", ["lastCLS"], PREPROCESS, cache_dir=tmp_path,
                           model={"checkpoint": "x.torch", "sha256": "abc"})
    assert len(calls) == 2  # 360 images in batches of 256
    again = split_features(trunk, "digits", "val", ["lastCLS"], PREPROCESS, cache_dir=tmp_path)
    assert len(calls) == 2 and isinstance(again.arrays["lastCLS"], np.memmap)
    assert np.array_equal(first.arrays["lastCLS"], again.arrays["lastCLS"])
    split_features(trunk, "digits", "val", ["lastCLS", "lastPOOL"], PREPROCESS, cache_dir=tmp_path)
    assert len(calls) == 4  # one more pass, for lastPOOL only
    (entry,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["trunk_sha256"] == state_digest(trunk) and meta["dataset"] == "digits" and meta["split"] == "val"
    assert meta["feature_sizes"] == {"lastCLS": 48, "lastPOOL": 48} and meta["num_samples"] == 360
    assert meta["preprocess"]["image_size"] == 32 and meta["model"] == {"checkpoint": "x.torch", "sha256": "abc"}
    assert sorted(path.name for path in entry.iterdir()) == ["lastCLS.npy", "lastPOOL.npy", "meta.json"]
    with torch.no_grad():
        trunk.norm.bias.add_(1.0)  # other weights: another cache entry
    split_features(trunk, "digits", "val", ["lastCLS"], PREPROCESS, cache_dir=tmp_path)
    assert len(calls) == 6 and len([path for path in tmp_path.iterdir() if path.is_dir()]) == 2


def test_feature_choices_are_checked_by_the_trunk(make_trunk):
    trunk = make_trunk()
    assert check_feature_choices(trunk, ["lastCLS", "concatPOOL3", "lastCLS+blkPOOL1"], 32) == {
        "lastCLS": 48, "concatPOOL3": 144, "lastCLS+blkPOOL1": 96}
    with pytest.raises(ValueError, match="unknown feature key 'lastFOO'; valid keys: lastCLS"):
        check_feature_choices(trunk, ["lastFOO"], 32)
    with pytest.raises(ValueError, match="only the last 1 of 3 blocks carry a class token"):
        check_feature_choices(trunk, ["concatCLS2"], 32)
    with pytest.raises(ValueError, match="has an empty part: join keys with '\\+'"):
        trunk_keys(["lastCLS+"])
    assert trunk_keys(["lastCLS", "lastCLS+lastPOOL", "lastPOOL"]) == ["lastCLS", "lastPOOL"]


def test_state_digest_sees_every_weight(make_trunk):
    trunk = make_trunk()
    digest = state_digest(trunk)
    assert digest == state_digest(make_trunk()) and len(digest) == 64
    with torch.no_grad():
        trunk.blocks[0].attn.gating[1] += 1e-6
    assert state_digest(trunk) != digest


def replace_images(folder, value):
    """Rewrite every PNG under ``folder`` with pixels ``value``, under the same names."""
    for path in sorted(folder.rglob("*.png")):
        Image.new("RGB", (32, 32), (value,) * 3).save(path)


def test_images_replaced_under_the_same_names_are_recomputed(empty_data, make_image_dataset, make_trunk, tmp_path):
    folder = make_image_dataset(tmp_path / "abc")
    assert main(["prepare-data", "abc", "--from", str(folder), "--quiet"]) == 0
    trunk = make_trunk()
    calls = count_calls(trunk)
    cache = tmp_path / "cache"
    first = np.array(split_features(trunk, "abc", "val", ["lastCLS"], PREPROCESS, cache_dir=cache).arrays["lastCLS"])
    replace_images(folder / "val", 200)
    cached = split_features(trunk, "abc", "val", ["lastCLS"], PREPROCESS, cache_dir=cache).arrays["lastCLS"]
    fresh = split_features(trunk, "abc", "val", ["lastCLS"], PREPROCESS).arrays["lastCLS"]
    assert len(calls) == 3 and not np.allclose(first, fresh, atol=1e-3)
    assert np.array_equal(cached, fresh)  # recomputed, not the old numbers
    (entry,) = [path for path in cache.iterdir() if path.is_dir()]  # the stale arrays were replaced in place
    assert sorted(path.name for path in entry.iterdir()) == ["lastCLS.npy", "meta.json"]

    stamps = {path: path.stat() for path in sorted((folder / "val").rglob("*.png"))}
    replace_images(folder / "val", 90)  # same sizes, and the old modification times put back
    for path, stat in stamps.items():
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
    again = split_features(trunk, "abc", "val", ["lastCLS"], PREPROCESS, cache_dir=cache).arrays["lastCLS"]
    assert len(calls) == 4
    assert np.array_equal(again, split_features(trunk, "abc", "val", ["lastCLS"], PREPROCESS).arrays["lastCLS"])


def test_what_decides_the_features_keys_the_cache(digits_data, make_trunk, tmp_path):
    trunk = make_trunk()
    calls = count_calls(trunk)
    split_features(trunk, "digits", "val", ["lastCLS"], PREPROCESS, cache_dir=tmp_path)
    split_features(trunk, "digits", "val", ["lastCLS"], Preprocess(32, 0.875, PREPROCESS.mean, PREPROCESS.std),
                   cache_dir=tmp_path)
    split_features(trunk, "digits", "train", ["lastCLS"], PREPROCESS, cache_dir=tmp_path)
    assert len(calls) == 2 + 2 + 6 and len([path for path in tmp_path.iterdir() if path.is_dir()]) == 3
    meta = json.loads(next(tmp_path.glob("*/meta.json")).read_text())
    assert "interpolation=bicubic" in meta["transform"] and "CenterCrop(size=(32, 32))" in meta["transform"]
    assert meta["num_samples"] in (360, 1437) and meta["torchvision"]


def test_orphaned_temporary_files_are_cleaned(digits_data, make_trunk, tmp_path):
    import socket
    import subprocess

    trunk = make_trunk()
    split_features(trunk, "digits", "val", ["lastCLS"], PREPROCESS, cache_dir=tmp_path)
    (entry,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    finished = subprocess.Popen(["true"])
    finished.wait()  # a process id that no longer runs: its writer was killed
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
    dead = entry / f".lastPOOL.{finished.pid}@{host}.npy.tmp"
    alive = entry / f".lastPOOL.{os.getpid()}@{host}.npy.tmp"
    elsewhere = entry / f".lastPOOL.{finished.pid}@another-host.npy.tmp"
    mine = entry / "notes.txt"
    for path in (dead, alive, elsewhere, mine):
        path.write_bytes(b"x" * 1000)
    split_features(trunk, "digits", "val", ["lastCLS"], PREPROCESS, cache_dir=tmp_path)
    assert not dead.exists() and alive.exists() and elsewhere.exists() and mine.exists()


def test_a_failed_extraction_leaves_no_temporary_file(empty_data, make_image_dataset, make_trunk, tmp_path):
    folder = make_image_dataset(tmp_path / "abc")
    assert main(["prepare-data", "abc", "--from", str(folder), "--quiet"]) == 0
    (folder / "val" / "c" / "2.png").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read image"):
        split_features(make_trunk(), "abc", "val", ["lastCLS"], PREPROCESS, cache_dir=tmp_path / "cache",
                       batch_size=4)
    assert [path.name for path in (tmp_path / "cache").rglob("*") if path.is_file()] == []
