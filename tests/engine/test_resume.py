"""A resumed run is the same run: SimCLR, DINO and MoCo killed mid-epoch (kill -9, SIGUSR2, SIGTERM) and resumed
end bit for bit where the uninterrupted run ends, with the same logged losses and no duplicated log entries.

Every run is one CPU process with one thread: 2 epochs of 8 iterations (256 digits, batch 32), a 2-block ConViT of
width 32, an iteration checkpoint every 3 iterations, a log line every iteration, gating records every 4.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from oracles import assert_same_training_state
from tiny_training import wait_for

COMMON = ["data=digits", "trunk.embed_dim=32", "trunk.depth=2", "trunk.local_up_to_layer=1",
          "config.DATA.TRAIN.DATA_LIMIT=256", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32",
          "config.DATA.NUM_DATALOADER_WORKERS=0", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=false",
          "config.OPTIMIZER.num_epochs=2", "config.LOG_FREQUENCY=1", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
          "config.HOOKS.CONVIT_GATING.FREQUENCY=4"]
SMALL_MLP = "[[mlp,{dims:[32,64],use_relu:true,skip_last_layer_relu_bn:false}],[mlp,{dims:[64,16]}]]"
METHODS = {
    "simclr": ["config=digits_simclr", f"config.MODEL.HEAD.PARAMS={SMALL_MLP}",
               "config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim=16"],
    # 2 global crops of 32 px and one local crop of 16 px, 64 prototypes, drop path in the student
    "dino": ["config=dino", "model=convit_tiny", "trunk.drop_path_rate=0.1",
             "config.DATA.TRAIN.TRANSFORMS.0.num_crops=[2,1]", "config.DATA.TRAIN.TRANSFORMS.0.total_num_crops=3",
             "config.DATA.TRAIN.TRANSFORMS.3.prob=[1.,0.1,0.5]", "config.DATA.TRAIN.TRANSFORMS.4.prob=[0.,0.2,0.]",
             "config.MODEL.HEAD.PARAMS=[[swav_head,{use_weight_norm_prototypes:true,dims:[32,32,16],use_bn:false,"
             "return_embeddings:false,activation_name:GELU,num_clusters:[64]}]]",
             "config.LOSS.dino_loss.output_dim=64"],
    "moco": ["config=moco", "model=convit_tiny", f"config.MODEL.HEAD.PARAMS={SMALL_MLP}",
             "config.LOSS.moco_loss.embedding_dim=16", "config.LOSS.moco_loss.queue_size=64"],
}
ITERATIONS_PER_EPOCH, EPOCHS = 8, 2


def _command(method, run_dir):
    return [sys.executable, "-m", "convit_ssl", "train", *METHODS[method], *COMMON, f"run_dir={run_dir}"]


def _logged(run_dir):
    """(iteration, loss, lr) of every line of stdout.json, (iteration, epoch) of every line of metrics.json, and
    (iteration, gates) of every gating record (its attention distances depend on the probe batch, the first
    batch a process sees, so they differ after a resume)."""
    def lines(name):
        return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]

    return ([(s["iter"], s["loss"], s["lr"]) for s in lines("stdout.json")],
            [(e["iteration"], e["train_phase_idx"]) for e in lines("metrics.json")],
            [(g["iteration"], [layer["gates"] for layer in g["layers"]]) for g in lines("gating_metrics.jsonl")])


def _final(run_dir):
    return torch.load(run_dir / f"model_final_checkpoint_phase{EPOCHS - 1}.torch", map_location="cpu",
                      weights_only=True)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, data_root):
    """method -> run folder of the uninterrupted run, trained once per module."""
    env = dict(os.environ, CONVIT_SSL_DATA=str(data_root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = {}

    def run(method):
        if method not in done:
            run_dir = tmp_path_factory.mktemp(f"straight-{method}") / "run"
            result = subprocess.run(_command(method, run_dir), env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            done[method] = run_dir
        return done[method]

    return run


@pytest.mark.slow
# SIGTERM (scontrol requeue) takes the SIGUSR2 path once caught: SimCLR covers it
@pytest.mark.parametrize("method, interruption", [(method, interruption) for method in sorted(METHODS)
                                                  for interruption in ("kill-9", "SIGUSR2")] + [("simclr", "SIGTERM")])
def test_interrupted_and_resumed_run_ends_where_the_straight_run_ends(method, interruption, straight_runs, tmp_path,
                                                                        train_env):
    straight = straight_runs(method)
    run_dir = tmp_path / "run"
    command = _command(method, run_dir)
    process = subprocess.Popen(command, env=train_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    log = run_dir / "log.txt"
    # into the second epoch, past the iteration-9 checkpoint
    started = wait_for(lambda: log.exists() and "iter: 10;" in log.read_text(), 300, process)
    saved = interruption == "kill-9"
    if not saved:
        process.send_signal(getattr(signal, interruption))
        saved = wait_for(lambda: (run_dir / "preemption_checkpoint.json").exists(), 120, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert started and saved, f"the run never reached iteration 10, or saved nothing after {interruption}"
    # what the killed run logged survives it: a stdout.json line for every iteration before the last in log.txt
    durable = [json.loads(line)["iter"] for line in (run_dir / "stdout.json").read_text().splitlines(keepends=True)
               if line.endswith("\n")]
    logged = [int(number) for number in re.findall(r"iter: (\d+);", log.read_text())]
    assert durable == list(range(len(durable))) and len(durable) >= max(logged), (durable, max(logged))

    result = subprocess.run(command, env=train_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed_from = re.search(r"Resume from file: \S*model_iteration(\d+)\.torch", result.stdout + result.stderr)
    assert resumed_from, "the run did not resume from an iteration checkpoint"
    iteration = int(resumed_from.group(1))
    assert iteration % ITERATIONS_PER_EPOCH != 0 and iteration >= 9, iteration  # mid-epoch 1

    expected, got = _final(straight), _final(run_dir)
    assert got["iteration"] == got["iteration_num"] == expected["iteration"] == EPOCHS * ITERATIONS_PER_EPOCH
    assert_same_training_state(expected, got)
    # every logged iteration once, with the straight run's loss, learning rate and gates
    assert _logged(run_dir) == _logged(straight)


@pytest.mark.slow
def test_two_processes_killed_mid_epoch_resume_into_the_same_run(tmp_path, train_env):
    """Two gloo ranks (4 iterations an epoch), each seeded from its rank: killed after the iteration-6 checkpoint."""
    def command(run_dir):
        return _command("simclr", run_dir) + ["config.DISTRIBUTED.NUM_PROC_PER_NODE=2"]

    straight = tmp_path / "straight"
    result = subprocess.run(command(straight), env=train_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(run_dir), env=train_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    log = run_dir / "log.txt"
    started = wait_for(lambda: log.exists() and "iter: 6;" in log.read_text(), 300, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert started, "the run never reached iteration 6"
    result = subprocess.run(command(run_dir), env=train_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"Resume from file: \S*model_iteration6\.torch", result.stdout + result.stderr)
    assert_same_training_state(_final(straight), _final(run_dir))
    assert _logged(run_dir) == _logged(straight)


@pytest.mark.slow
def test_loader_workers_do_not_change_the_run(straight_runs, tmp_path, train_env):
    """Augmentations are seeded per sample: two loader worker processes make the run of none, bit for bit."""
    run_dir = tmp_path / "run"
    command = [*_command("simclr", run_dir), "config.DATA.NUM_DATALOADER_WORKERS=2"]
    result = subprocess.run(command, env=train_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    straight = straight_runs("simclr")
    assert_same_training_state(_final(straight), _final(run_dir))
    assert _logged(run_dir) == _logged(straight)
