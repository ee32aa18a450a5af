"""`convit-ssl train` end to end on the digits: pretraining, probing, two processes, kill and resume."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import convit_ssl
from tiny_training import run as _run
from tiny_training import train_command as _train_command
from tiny_training import wait_for as _wait_for


@pytest.mark.slow
def test_pretrain_then_probe_above_chance(tmp_path, train_env):
    import json

    run_dir = tmp_path / "run"
    # the DeiT twin: its head count cannot be read from shapes, so loading must use the run's config
    result = _run(_train_command(run_dir, "config.OPTIMIZER.num_epochs=2", "trunk.local_up_to_layer=0"), train_env)
    assert (run_dir / "model_final_checkpoint_phase1.torch").is_file()
    assert (run_dir / "metrics.json").is_file() and list((run_dir / "tb_logs").iterdir())
    last_line = result.stdout.splitlines()[-1]
    assert last_line == f"done: checkpoints, metrics.json and TensorBoard logs (tb_logs/) in {run_dir}"
    trunk, report = convit_ssl.load_trunk(run_dir / "checkpoint.torch")
    assert report.source_format == "vissl" and trunk.embed_dim == 32 and trunk.local_up_to_layer == 0
    _run([sys.executable, "-m", "convit_ssl", "linear-probe", "--checkpoint", str(run_dir / "checkpoint.torch"),
          "--recipe", "digits", "--threads", "1", "--out", str(tmp_path / "eval")], train_env)
    (result_file,) = (tmp_path / "eval").rglob("*.json")
    result = json.loads(result_file.read_text())
    assert result["trunk"]["unchanged"]
    assert result["chosen"]["test_top1"] > 30.0, result["chosen"]  # chance is 10%; two epochs of a 2-block trunk


@pytest.mark.slow
def test_without_tensorboard_the_last_line_names_no_tensorboard_logs(tmp_path, train_env):
    run_dir = tmp_path / "run"
    result = _run(_train_command(run_dir, "config.OPTIMIZER.num_epochs=1", "config.DATA.TRAIN.DATA_LIMIT=128",
                                 "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=false"), train_env)
    assert not (run_dir / "tb_logs").exists()
    assert result.stdout.splitlines()[-1] == f"done: checkpoints and metrics.json in {run_dir}"


@pytest.mark.parametrize("written, line", [
    (["model_final_checkpoint_phase0.torch", "metrics.json", "tb_logs/"],
     "done: checkpoints, metrics.json and TensorBoard logs (tb_logs/) in {}"),
    (["model_final_checkpoint_phase0.torch", "metrics.json"], "done: checkpoints and metrics.json in {}"),
    (["metrics.json"], "done: metrics.json in {}"),
    ([], "done: nothing written in {}"),
])
def test_the_last_line_names_what_the_run_folder_holds(written, line, tmp_path, data_root, monkeypatch, capsys):
    """The training itself is replaced by one that leaves ``written`` in the run folder."""
    from pathlib import Path

    from convit_ssl import cli, engine
    from tiny_training import TINY

    def train(config):
        run_dir = Path(config.CHECKPOINT.DIR)
        run_dir.mkdir()
        for name in written:
            (run_dir / name).mkdir() if name.endswith("/") else (run_dir / name).write_text("")
        return run_dir

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    monkeypatch.setattr(engine, "train", train)
    run_dir = tmp_path / "run"
    assert cli.main(["train", *TINY, f"run_dir={run_dir}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == line.format(run_dir)


@pytest.mark.slow
def test_two_processes_with_gloo(tmp_path, train_env):
    run_dir = tmp_path / "run"
    result = _run(_train_command(run_dir, "config.OPTIMIZER.num_epochs=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"),
                  train_env)
    log = (run_dir / "log.txt").read_text() + result.stdout + result.stderr
    assert "world_size: 2" in log, log[-2000:]
    assert (run_dir / "model_final_checkpoint_phase0.torch").is_file()


@pytest.mark.slow
def test_killed_mid_epoch_resumes_and_finishes(tmp_path, train_env):
    run_dir = tmp_path / "run"
    command = _train_command(run_dir, "config.OPTIMIZER.num_epochs=2", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=5")
    process = subprocess.Popen(command, env=train_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    started = _wait_for(lambda: (run_dir / "model_iteration10.torch").exists(), 300, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert started, "the run never wrote its iteration-10 checkpoint"
    assert not (run_dir / "model_final_checkpoint_phase1.torch").exists()
    for checkpoint in run_dir.glob("model_*.torch"):
        torch.load(checkpoint, map_location="cpu", weights_only=True)  # every file left is complete
    result = _run(command, train_env)
    log = result.stdout + result.stderr
    assert "Resume from file" in log and "model_iteration" in log
    final = torch.load(run_dir / "model_final_checkpoint_phase1.torch", map_location="cpu", weights_only=True)
    assert final["iteration"] == 2 * 22  # every iteration ran exactly once across the kill


@pytest.mark.slow  # writes half a gigabyte
def test_kill_during_checkpoint_write_leaves_previous_file(tmp_path):
    from convit_ssl.vissl_glue import _latest_checkpoint_file

    torch.save({"iteration": 5}, tmp_path / "model_iteration5.torch")
    writer = (
        "import sys, torch\n"
        "from convit_ssl.vissl_glue import _atomic_save_checkpoint\n"
        f"_atomic_save_checkpoint({str(tmp_path)!r}, {{'iteration': 10, 'big': torch.ones(2**27)}},"
        " 'model_iteration10.torch')\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer], start_new_session=True)
    partial = lambda: any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir())
    assert _wait_for(partial, 120, process), "the writer never started writing"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "model_iteration10.torch").exists()
    assert _latest_checkpoint_file(str(tmp_path), config=None) == "model_iteration5.torch"
    assert torch.load(tmp_path / "model_iteration5.torch")["iteration"] == 5


@pytest.mark.slow
def test_sigusr2_saves_a_mid_epoch_checkpoint_then_resume(tmp_path, train_env):
    """SLURM sends SIGUSR2 before a time limit: the run saves at its next step, and a rerun resumes there."""
    import json

    run_dir = tmp_path / "run"
    command = _train_command(run_dir, "config.OPTIMIZER.num_epochs=2")
    process = subprocess.Popen(command, env=train_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    log = run_dir / "log.txt"
    assert _wait_for(lambda: log.exists() and "iter: 5;" in log.read_text(), 300, process), "training never started"
    process.send_signal(signal.SIGUSR2)
    marker = run_dir / "preemption_checkpoint.json"
    saved = _wait_for(marker.exists, 120, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert saved, "no checkpoint after SIGUSR2"
    iteration = json.loads(marker.read_text())["iteration"]
    assert 5 <= iteration < 22 and (run_dir / f"model_iteration{iteration}.torch").is_file()  # mid-epoch 0
    result = _run(command, train_env)
    assert f"model_iteration{iteration}.torch" in result.stdout + result.stderr
    final = torch.load(run_dir / "model_final_checkpoint_phase1.torch", map_location="cpu", weights_only=True)
    assert final["iteration"] == 2 * 22
