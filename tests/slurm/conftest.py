"""Fixtures of the launcher tests: a throwaway SLURM cluster (``cluster.py``), a digits data root, fresh job folders.

The cluster is started once per session and torn down after it; without the Slurm packages (and not root, so
they cannot be installed) the SLURM tests skip with the reason, and the ``--local`` tests still run.
"""
import importlib.util
import os
from pathlib import Path

import pytest

from convit_ssl.data import DATA_ENV
from convit_ssl.launch import RUNS_ENV

_spec = importlib.util.spec_from_file_location("convit_ssl_test_slurm_cluster", Path(__file__).with_name("cluster.py"))
cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cluster)

# A tiny DINO run on digits: 2 x 32 px + 1 x 16 px crops, a 2-block ConViT, a 64-prototype head, 4 iterations an
# epoch on one node. Jobs inherit the submitting environment, so the threads are set there (2 cores in CI).
TINY = [
    "config=dino", "model=convit_tiny", "data=digits", "trunk.depth=2", "trunk.local_up_to_layer=1",
    "config.DATA.TRAIN.DATA_LIMIT=32", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
    "config.DATA.NUM_DATALOADER_WORKERS=0", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=false",
    "config.DATA.TRAIN.TRANSFORMS.0.num_crops=[2,1]", "config.DATA.TRAIN.TRANSFORMS.0.total_num_crops=3",
    "config.DATA.TRAIN.TRANSFORMS.3.prob=[1.,0.1,0.5]", "config.DATA.TRAIN.TRANSFORMS.4.prob=[0.,0.2,0.]",
    "config.MODEL.HEAD.PARAMS=[[swav_head,{use_weight_norm_prototypes:true,dims:[192,32,16],use_bn:false,"
    "return_embeddings:false,activation_name:GELU,num_clusters:[64]}]]",
    "config.LOSS.dino_loss.output_dim=64", "config.OPTIMIZER.num_epochs=2",
]
JOB_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


@pytest.fixture
def tiny():
    return list(TINY)


@pytest.fixture
def job_env(monkeypatch, tmp_path, data_root):
    """A fresh runs folder per test (job ids restart at 1 with every cluster), threads, loopback gloo, no cluster."""
    runs = tmp_path / "runs"
    # a Slurm command run by mistake fails at once instead of looking a controller up by DNS
    no_cluster = tmp_path / "no-slurm.conf"
    no_cluster.write_text("# no cluster in this test\n")
    env = {**JOB_ENV, RUNS_ENV: str(runs), DATA_ENV: str(data_root), "SLURM_CONF": str(no_cluster)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return runs


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = cluster.ensure_installed()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    if os.geteuid() != 0:
        pytest.skip("no local SLURM cluster: starting slurmd in a private mount namespace needs root")
    running = cluster.SlurmCluster(nodes=2, cpus=4).start()
    yield running
    running.stop()


@pytest.fixture
def slurm(slurm_cluster, job_env, monkeypatch):
    """The cluster, with SLURM_CONF and the sacct stand-in in this process's environment (jobs inherit it)."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    yield slurm_cluster
    leftover = slurm_cluster.queue()
    if leftover:
        slurm_cluster.run("scancel", *leftover, check=False)
        slurm_cluster.wait_until_idle(30)
