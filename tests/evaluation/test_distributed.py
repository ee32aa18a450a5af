"""Evaluation on several processes (gloo on CPU, one thread each): shards, gathers, the sharded feature cache, and
the same numbers as one process. The multi-process runs start ``python -m convit_ssl`` as torchrun would."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from oracles import assert_same_probe

from convit_ssl.cli import main
from convit_ssl.evaluation import distributed

REPO = Path(__file__).resolve().parents[2]
TINY_OPTIONS = ["--random", "convit_tiny", "--trunk-option", "patch_size=8", "--trunk-option", "embed_dim=48",
                "--trunk-option", "depth=3", "--trunk-option", "local_up_to_layer=2", "--quiet"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world, argv, timeout=240):
    """``python -m convit_ssl ARGV`` as ``world`` processes of one gloo group (torchrun's environment)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world), "GLOO_SOCKET_IFNAME": "lo"}
    ranks = [subprocess.Popen([sys.executable, "-m", "convit_ssl", *argv, "--threads", "1"], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = [rank.communicate(timeout=timeout)[0] for rank in ranks]
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 0, output
    return outputs


def only_result(folder):
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("num_samples, world", [(7, 3), (6, 3), (2, 4), (5, 1), (0, 2), (1, 4), (10, 4), (13, 5),
                                                (1437, 8), (360, 7)])
def test_shards_are_the_samplers_lists_without_its_padding(num_samples, world):
    """``DistributedSampler`` is the oracle: each rank's shard is its list with the padded entries (those at
    positions >= num_samples of the padded index list) left out, and the shards cover every sample once."""
    shards = [distributed.shard_indices(num_samples, r, world) for r in range(world)]
    for r, shard in enumerate(shards):
        sampler = DistributedSampler(range(num_samples), num_replicas=world, rank=r, shuffle=False, drop_last=False)
        listed = list(sampler)
        positions = range(r, sampler.total_size, world)  # where the rank's entries sit in the padded list
        assert shard.dtype == np.int64
        assert shard.tolist() == [index for position, index in zip(positions, listed) if position < num_samples]
    assert sorted(np.concatenate(shards).tolist()) == list(range(num_samples))
    if (num_samples, world) == (7, 3):  # the sampler pads with samples 0 and 1, which ranks 1 and 2 leave out
        assert [list(DistributedSampler(range(7), num_replicas=3, rank=r, shuffle=False)) for r in range(3)] == [
            [0, 3, 6], [1, 4, 0], [2, 5, 1]]
        assert [shard.tolist() for shard in shards] == [[0, 3, 6], [1, 4], [2, 5]]


def test_one_process_touches_no_process_group(monkeypatch):
    for name in distributed.ENV_KEYS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env("cpu") == "cpu" and not distributed.active()
    rows = np.arange(12.0).reshape(4, 3)
    assert np.array_equal(distributed.gather_rows(rows[[2, 0, 3, 1]], np.array([2, 0, 3, 1]), 4), rows)
    assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.world_size() == 1 and distributed.is_main()


def test_an_incomplete_environment_is_one_line(digits_data, tmp_path, capsys, monkeypatch):
    for name in distributed.ENV_KEYS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["knn", *TINY_OPTIONS, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset: start the ranks with torchrun" in err
    assert err.count("\n") == 1 and not list(tmp_path.glob("*.json"))


@pytest.mark.slow
def test_knn_on_two_processes_equals_one_and_their_cache_serves_any_world_size(digits_data, tmp_path):
    """kNN of 2 gloo ranks (each extracting half of digits) = kNN of one process, exactly; the 2 ranks' cache
    shards are read by one process without extracting again, and one process's cache by 2 ranks."""
    knn = ["knn", *TINY_OPTIONS, "--ks", "1", "10", "20"]
    two_cache, one_cache = tmp_path / "cache2", tmp_path / "cache1"
    outputs = run_ranks(2, [*knn, "--out", str(tmp_path / "two"), "--cache", str(two_cache)])
    assert "result" in outputs[0] and "result" not in outputs[1]  # rank 0 writes and reports, alone
    assert main([*knn, "--out", str(tmp_path / "one"), "--no-cache"]) == 0
    two, one = only_result(tmp_path / "two"), only_result(tmp_path / "one")
    assert two["manifest"]["world_size"] == 2 and one["manifest"]["world_size"] == 1
    assert two["accuracy"] == one["accuracy"] and two["rows"] == one["rows"]
    assert two["dataset"] == one["dataset"] == {**one["dataset"], "train": 1437, "test": 360}

    entries = sorted(path for path in two_cache.iterdir() if path.is_dir())
    for entry in entries:  # train and val, each as rank 0's and rank 1's half
        meta = json.loads((entry / "meta.json").read_text())
        assert meta["shards"] == {"lastCLS": 2}
        assert sorted(p.name for p in entry.iterdir()) == [
            "lastCLS.shard-0-of-2.npy", "lastCLS.shard-1-of-2.npy", "meta.json"]
        halves = [np.load(entry / f"lastCLS.shard-{r}-of-2.npy") for r in range(2)]
        assert len(halves[0]) == -(-meta["num_samples"] // 2) and sum(map(len, halves)) == meta["num_samples"]
    stamps = {path: path.stat().st_mtime_ns for path in two_cache.rglob("*.npy")}
    assert main([*knn, "--out", str(tmp_path / "reread"), "--cache", str(two_cache)]) == 0
    assert {path: path.stat().st_mtime_ns for path in two_cache.rglob("*.npy")} == stamps  # read, not redone
    assert only_result(tmp_path / "reread")["accuracy"] == one["accuracy"]

    assert main([*knn, "--out", str(tmp_path / "single"), "--cache", str(one_cache)]) == 0
    assert sorted(p.name for p in one_cache.rglob("*.npy")) == ["lastCLS.npy", "lastCLS.npy"]
    stamps = {path: path.stat().st_mtime_ns for path in one_cache.rglob("*.npy")}
    run_ranks(2, [*knn, "--out", str(tmp_path / "two-from-one"), "--cache", str(one_cache)])
    assert {path: path.stat().st_mtime_ns for path in one_cache.rglob("*.npy")} == stamps
    assert only_result(tmp_path / "two-from-one")["accuracy"] == one["accuracy"]
    assert [entry.name for entry in entries] == sorted(p.name for p in one_cache.iterdir())  # one key, any world


@pytest.mark.slow
def test_probe_grid_on_two_processes_matches_one(digits_data, tmp_path):
    """Cached features: each rank extracts half, all hold every feature, and each batch's gradient is the sum of
    the ranks' halves; 2 x 2 x 2 heads of 20 epochs (batch 256: 6 steps an epoch, the last of 8 + 9 images)."""
    probe = ["linear-probe", *TINY_OPTIONS, "--epochs", "20", "--lrs", "0.1", "1", "--wds", "0", "0.001",
             "--features", "lastCLS", "lastCLS+lastPOOL", "--no-cache"]
    outputs = run_ranks(2, [*probe, "--out", str(tmp_path / "two")])
    assert "chosen on heldout" in outputs[0] and "chosen" not in outputs[1]
    assert main([*probe, "--out", str(tmp_path / "one")]) == 0
    assert_same_probe(only_result(tmp_path / "two"), only_result(tmp_path / "one"), world_size=2)


@pytest.mark.slow
def test_streamed_probe_on_two_processes_matches_one(digits_data, tmp_path):
    """Streamed: each rank augments and runs the trunk on its part of every global batch; the augmentations are
    seeded per image, so both runs see the same images."""
    probe = ["linear-probe", *TINY_OPTIONS, "--stream", "--epochs", "2", "--fraction", "0.3", "--batch-size", "64",
             "--lrs", "0.3", "1", "--wds", "0", "--features", "lastCLS+lastPOOL", "--no-cache"]
    run_ranks(2, [*probe, "--out", str(tmp_path / "two")])
    assert main([*probe, "--out", str(tmp_path / "one")]) == 0
    two, one = only_result(tmp_path / "two"), only_result(tmp_path / "one")
    assert_same_probe(two, one, world_size=2)
    assert two["dataset"]["train"] + two["dataset"]["heldout"] == 425  # 30% of each class, floored
    assert not list(tmp_path.rglob(".probe-state-*"))  # the heads' checkpoints are gone once the probe is done
