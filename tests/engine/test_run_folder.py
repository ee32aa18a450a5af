"""A run folder belongs to one run at a time and keeps the config its checkpoints were trained with."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from convit_ssl import engine

from tiny_training import TINY
from tiny_training import train_command as _train_command
from tiny_training import wait_for as _wait_for

HOLD_LOCK = (
    "import sys, time\n"
    "from convit_ssl import run_folder\n"
    "with run_folder.owned(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def _hold_lock(run_dir):
    """A process that holds the run folder until it is killed; returns it once the lock is held."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _refused(command, env):
    """The one line that ``command`` (a subprocess) prints when it refuses to start (exit status 2)."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _finished_run(run_dir, *extra):
    """``run_dir`` as a stopped run leaves it: its config recorded, one checkpoint (not trained, never loaded)."""
    from convit_ssl import run_folder

    config = engine.compose([*TINY, *extra], run_dir=str(run_dir))
    run_dir.mkdir(parents=True)
    run_folder.record_config(run_dir, engine.plain_config(config))
    (run_dir / "model_phase0.torch").write_bytes(b"a checkpoint")
    return config


# ---------------------------------------------------------------------------------------------- one run at a time
@pytest.mark.slow
def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    from convit_ssl import run_folder

    holder = _hold_lock(tmp_path)
    with pytest.raises(run_folder.RunFolderError, match=f"pid {holder.pid}"):
        with run_folder.owned(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_folder.owned(tmp_path):
        assert f"pid {os.getpid()} " in (tmp_path / run_folder.LOCK_FILE).read_text()
    with run_folder.owned(tmp_path):  # released at the end of the block, too
        pass


@pytest.mark.slow
def test_two_trainings_in_one_folder_only_the_first_runs(tmp_path, train_env):
    # The first run is far longer than the test lets it live, so it surely holds the folder when the second
    # starts (a 2-epoch run could finish first on an idle machine, and the second would meet its checkpoints).
    run_dir = tmp_path / "run"
    first = subprocess.Popen(_train_command(run_dir, "config.OPTIMIZER.num_epochs=1000"), env=train_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for(lambda: (run_dir / "log.txt").exists(), 300, first), "the first training never started"
        line = _refused(_train_command(run_dir, "config.OPTIMIZER.num_epochs=3"), train_env)
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in line, line
        assert first.poll() is None, "the first training stopped when the second was refused"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    recorded = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    assert recorded["OPTIMIZER"]["num_epochs"] == 1000


# ---------------------------------------------------------------------------------------------- recorded config
def _cli_refusal(capsys, *words):
    """The one line ``convit-ssl train WORDS`` prints when it refuses (exit status 2), run in this process."""
    from convit_ssl import cli

    assert cli.main(["train", *words]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_compose_and_print_config_write_nothing(tmp_path, data_root, monkeypatch, capsys):
    from convit_ssl import cli

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    run_dir = tmp_path / "new" / "run"
    assert cli.main(["train", *TINY, f"run_dir={run_dir}", "--print-config"]) == 0
    assert "OPTIMIZER" in capsys.readouterr().out
    engine.compose(["config=swav", "data=digits"], run_dir=str(run_dir))  # VISSL's SwAV inference makes the folder
    assert not (tmp_path / "new").exists()


def test_a_different_config_on_a_run_with_checkpoints_is_refused(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    run_dir = tmp_path / "run"
    _finished_run(run_dir)
    before = (run_dir / "train_config.yaml").read_bytes()
    line = _cli_refusal(capsys, *TINY, f"run_dir={run_dir}", "trunk.depth=3", "config.OPTIMIZER.num_epochs=3")
    assert "MODEL.TRUNK.CONVIT_SSL.OVERRIDES.depth: 2 -> 3" in line and "OPTIMIZER.num_epochs" in line, line
    assert "new run_dir" in line and "continue_with_changes=true" in line
    assert (run_dir / "train_config.yaml").read_bytes() == before
    assert not (run_dir / "log.txt").exists()


@pytest.mark.slow
def test_same_config_again_and_a_folder_without_checkpoints_are_accepted(tmp_path, data_root, monkeypatch):
    from convit_ssl import run_folder

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    run_dir = tmp_path / "run"
    config = _finished_run(run_dir)
    moved = engine.compose(TINY, run_dir=str(tmp_path / "moved"))  # the same run in another folder
    assert run_folder.record_config(run_dir, engine.plain_config(moved)) == {}
    assert yaml.safe_load((run_dir / "train_config.yaml").read_text())["CHECKPOINT"]["DIR"] == config.CHECKPOINT.DIR
    (run_dir / "model_phase0.torch").unlink()
    deeper = engine.compose([*TINY, "trunk.depth=3"], run_dir=str(run_dir))
    assert run_folder.record_config(run_dir, engine.plain_config(deeper)) == {}  # nothing trained to protect
    assert yaml.safe_load((run_dir / "train_config.yaml").read_text())["MODEL"]["TRUNK"]["CONVIT_SSL"][
        "OVERRIDES"]["depth"] == 3


@pytest.mark.parametrize("checkpoint", ["model_phase3.torch", "model_final_checkpoint_phase799.torch"])
@pytest.mark.parametrize("continue_with_changes", [False, True])
def test_checkpoints_without_a_recorded_config_are_refused(tmp_path, checkpoint, continue_with_changes):
    """Checkpoints that no config of ours was recorded for (copied or downloaded there): a run would resume from
    them, or count itself finished, and prune them."""
    from convit_ssl import run_folder

    (tmp_path / checkpoint).write_bytes(b"someone's checkpoint")
    with pytest.raises(run_folder.RunFolderError, match=f"holds checkpoints \\({checkpoint}\\) but no "
                       f"train_config.yaml.*pick a new run_dir"):
        run_folder.record_config(tmp_path, {"OPTIMIZER": {"num_epochs": 2}}, continue_with_changes)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint]


def test_continue_with_changes_records_the_change(tmp_path, data_root, monkeypatch):
    import json

    from convit_ssl import run_folder

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    run_dir = tmp_path / "run"
    _finished_run(run_dir)
    config = engine.compose([*TINY, "config.OPTIMIZER.num_epochs=5", "continue_with_changes=true"],
                            run_dir=str(run_dir))
    assert config.CONVIT_SSL.CONTINUE_WITH_CHANGES
    changes = run_folder.record_config(run_dir, engine.plain_config(config), continue_with_changes=True)
    assert changes == {"OPTIMIZER.num_epochs": (30, 5)}
    (entry,) = [json.loads(line) for line in (run_dir / run_folder.CONFIG_HISTORY_FILE).read_text().splitlines()]
    assert entry["changes"]["OPTIMIZER.num_epochs"]["new"] == 5 and entry["continues_from"] == "model_phase0.torch"
    assert yaml.safe_load((run_dir / "train_config.yaml").read_text())["OPTIMIZER"]["num_epochs"] == 5


def test_a_crash_between_history_and_config_is_recorded_once_on_retry(tmp_path, data_root, monkeypatch):
    """A crash after the history line and before ``train_config.yaml``: the retry records the config and leaves
    one line for the change, not two."""
    import json

    from convit_ssl import atomic, run_folder

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    run_dir = tmp_path / "run"
    _finished_run(run_dir)
    config = engine.plain_config(engine.compose(
        [*TINY, "config.OPTIMIZER.num_epochs=5", "continue_with_changes=true"], run_dir=str(run_dir)))
    write_text = atomic.write_text

    def crash(text, path):
        raise OSError("killed")

    monkeypatch.setattr(atomic, "write_text", crash)
    with pytest.raises(OSError, match="killed"):
        run_folder.record_config(run_dir, config, continue_with_changes=True)
    assert yaml.safe_load((run_dir / "train_config.yaml").read_text())["OPTIMIZER"]["num_epochs"] == 30
    monkeypatch.setattr(atomic, "write_text", write_text)
    assert run_folder.record_config(run_dir, config, continue_with_changes=True) == {
        "OPTIMIZER.num_epochs": (30, 5)}
    (entry,) = [json.loads(line) for line in (run_dir / run_folder.CONFIG_HISTORY_FILE).read_text().splitlines()]
    assert entry["changes"] == {"OPTIMIZER.num_epochs": {"old": 30, "new": 5}}
    assert yaml.safe_load((run_dir / "train_config.yaml").read_text())["OPTIMIZER"]["num_epochs"] == 5


@pytest.mark.slow
def test_continue_with_changes_on_a_finished_run_is_refused(tmp_path, data_root, monkeypatch):
    """VISSL trains nothing after a final checkpoint: continuing would only have rewritten the record."""
    from convit_ssl import run_folder

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    run_dir = tmp_path / "run"
    _finished_run(run_dir)
    (run_dir / "model_final_checkpoint_phase0.torch").write_bytes(b"the final checkpoint")
    recorded = (run_dir / "train_config.yaml").read_bytes()
    config = engine.compose([*TINY, "config.OPTIMIZER.num_epochs=5", "continue_with_changes=true"],
                            run_dir=str(run_dir))
    with pytest.raises(run_folder.RunFolderError, match=r"has finished \(model_final_checkpoint_phase0.torch\): "
                       r"continue_with_changes would train nothing.*pick a new run_dir"):
        run_folder.record_config(run_dir, engine.plain_config(config), continue_with_changes=True)
    assert (run_dir / "train_config.yaml").read_bytes() == recorded
    assert not (run_dir / run_folder.CONFIG_HISTORY_FILE).exists()


def test_checkpoints_in_a_subfolder_of_the_run_id_are_refused_at_compose(tmp_path, data_root, monkeypatch):
    """With APPEND_DISTR_RUN_ID, VISSL writes a multi-node run's checkpoints to ``run_dir/<RUN_ID>``: the recorded
    config in ``run_dir`` would never see them, and a new port would start the run afresh."""
    from convit_ssl.errors import UsageError

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    with pytest.raises(UsageError, match=r"APPEND_DISTR_RUN_ID=true: .*run_dir/<RUN_ID>.*leave it false"):
        engine.compose([*TINY, "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.RUN_ID=node1:4000",
                        "config.CHECKPOINT.APPEND_DISTR_RUN_ID=true"], run_dir=str(tmp_path / "run"))


def test_config_differences_ignore_where_the_run_lives():
    from convit_ssl.run_folder import config_differences

    old = {"CHECKPOINT": {"DIR": "/a/run"}, "LOSS": {"swav_loss": {"output_dir": "/a/run", "epsilon": 0.05}},
           "DISTRIBUTED": {"RUN_ID": "node1:4000"}, "OPTIMIZER": {"num_epochs": 10}}
    new = {"CHECKPOINT": {"DIR": "/b/run"}, "LOSS": {"swav_loss": {"output_dir": "/b/run", "epsilon": 0.03}},
           "DISTRIBUTED": {"RUN_ID": "node7:4100"}, "OPTIMIZER": {"num_epochs": 10, "extra": 1}}
    assert config_differences(old, new) == {"LOSS.swav_loss.epsilon": (0.05, 0.03),
                                            "OPTIMIZER.extra": ("<absent>", 1)}


def test_the_final_checkpoint_is_that_of_the_most_epochs(tmp_path):
    from convit_ssl import run_folder
    from convit_ssl.launch import final_checkpoint

    for name in ("model_final_checkpoint_phase9.torch", "model_final_checkpoint_phase29.torch", "model_phase30.torch",
                 "model_final_checkpoint_phase19.torch", "model_final_checkpoint_phase39_shard0.torch"):
        (tmp_path / name).write_bytes(b"checkpoint")
    final = tmp_path / "model_final_checkpoint_phase29.torch"  # a run extended from 10 to 20 to 30 epochs
    assert run_folder.final_checkpoint(tmp_path) == final == run_folder.latest_checkpoint(tmp_path)
    assert final_checkpoint(tmp_path) == final
    assert run_folder.latest_checkpoint(tmp_path, skip_final=True) == tmp_path / "model_phase30.torch"


def test_a_copy_under_a_name_of_its_own_is_not_where_the_run_resumes(tmp_path):
    """A user's copy (``cp model_phase0.torch model_phase0_backup.torch``) is newer than the run's last checkpoint,
    but a resume, and an evaluation of the folder, read the run's own newest."""
    from convit_ssl import run_folder

    for order, name in enumerate(["model_phase0.torch", "model_iteration12.torch", "model_phase0_backup.torch",
                                  "model_best.torch"]):
        (tmp_path / name).write_bytes(b"checkpoint")
        os.utime(tmp_path / name, ns=(10**18 + order * 10**9,) * 2)
    assert run_folder.latest_checkpoint(tmp_path) == tmp_path / "model_iteration12.torch"
    assert run_folder.run_checkpoint(tmp_path) == tmp_path / "model_iteration12.torch"


def test_the_newest_checkpoint_is_the_furthest_trained_whatever_the_file_times(tmp_path):
    """After ``cp -r`` (no ``-p``) the file times say when each file was copied: a resume and pruning go by the
    updates each checkpoint holds (VISSL's ``iteration``), an epoch's checkpoint after an iteration one of the
    same update. A run of 22 updates an epoch that also checkpoints every 10, and every 22 (its last step)."""
    import torch

    from convit_ssl import run_folder

    updates = {"model_iteration10.torch": 10, "model_iteration20.torch": 20, "model_phase0.torch": 22,
               "model_iteration30.torch": 30, "model_iteration44.torch": 44, "model_phase1.torch": 44,
               "model_iteration50.torch": 50}
    for order, (name, iteration) in enumerate(updates.items()):
        torch.save({"iteration": iteration, "phase_idx": iteration // 22}, tmp_path / name)
        os.utime(tmp_path / name, ns=(10**18 - order * 10**9,) * 2)  # copied newest first
    assert run_folder.latest_checkpoint(tmp_path) == tmp_path / "model_iteration50.torch"
    assert run_folder.latest_checkpoint(tmp_path, nth=2) == tmp_path / "model_phase1.torch"
    assert run_folder.run_checkpoint(tmp_path) == tmp_path / "model_iteration50.torch"
    deleted = run_folder.prune_checkpoints(tmp_path, keep_last=3, keep_every_epochs=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_iteration44.torch", "model_iteration50.torch", "model_phase1.torch"]
    assert len(deleted) == 4
    (tmp_path / "model_iteration50.torch").unlink()
    for order, name in enumerate(["model_phase1.torch", "model_iteration44.torch"]):  # copied in that order
        os.utime(tmp_path / name, ns=(10**18 + order * 10**9,) * 2)
    assert run_folder.latest_checkpoint(tmp_path) == tmp_path / "model_phase1.torch"


def test_files_that_are_not_the_runs_checkpoints_are_not_resumed_from(tmp_path):
    """VISSL's own test counts any *.torch as a checkpoint to resume from; with none of the run's own, a folder
    holding ``pretrained.torch`` or a copy ``model_best.torch`` starts training afresh (VISSL then asked the run's
    rule for the file, got none, and resumed from the path ``.../None``)."""
    from vissl.utils.checkpoint import get_resume_checkpoint

    import convit_ssl.vissl_glue  # noqa: F401  (its patches)

    config = {"CHECKPOINT": {"OVERWRITE_EXISTING": False, "AUTO_RESUME": True, "LATEST_CHECKPOINT_RESUME_FILE_NUM": 1}}
    for name in ("pretrained.torch", "model_best.torch"):
        (tmp_path / name).write_bytes(b"someone's weights")
    assert get_resume_checkpoint(config, str(tmp_path)) is None
    (tmp_path / "model_phase0.torch").write_bytes(b"checkpoint")
    assert get_resume_checkpoint(config, str(tmp_path)) == f"{tmp_path}/model_phase0.torch"
