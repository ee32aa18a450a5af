"""Old checkpoints are deleted once newer ones are complete; the newest, the linked, the final and milestones stay."""
import os

import pytest
import torch

from tiny_training import run, train_command


def _write(folder, name, mtime, iteration=None):
    """A checkpoint file of ``name`` holding VISSL's ``iteration`` (None: bytes that are no checkpoint)."""
    path = folder / name
    if iteration is None:
        path.write_bytes(b"checkpoint")
    else:
        torch.save({"iteration": iteration}, path)
    os.utime(path, ns=(mtime, mtime))
    return path


def test_prune_keeps_the_newest_the_linked_the_final_and_milestones(tmp_path):
    from convit_ssl.run_folder import prune_checkpoints

    names = [f"model_phase{n}.torch" for n in range(10)] + ["model_iteration230.torch", "model_iteration250.torch"]
    for order, name in enumerate(names):
        _write(tmp_path, name, 10**18 + order * 10**9, iteration=20 * (order + 1) if order < 10 else None)
    foreign = ["model_phase3_shard0.torch", "model_phase2.torch.tmp", "model_phase1_backup.torch", "notes.torch"]
    for name in foreign:
        _write(tmp_path, name, 10**18)
    _write(tmp_path, "model_final_checkpoint_phase10.torch", 1)  # the final one, whatever its time
    os.symlink("model_phase6.torch", tmp_path / "checkpoint.torch")  # what an evaluation reads
    deleted = prune_checkpoints(tmp_path, keep_last=2, keep_every_epochs=5)
    kept = {"model_iteration230.torch", "model_iteration250.torch",  # the 2 newest
            "model_phase4.torch", "model_phase9.torch",  # epochs 5 and 10
            "model_phase6.torch", "model_final_checkpoint_phase10.torch", *foreign}
    assert {p.name for p in tmp_path.iterdir()} == kept | {"checkpoint.torch"}
    assert sorted(p.name for p in deleted) == sorted(set(names) - kept)
    assert prune_checkpoints(tmp_path, keep_last=-1, keep_every_epochs=0) == []


def test_prune_keeps_an_epoch_checkpoint_it_cannot_read(tmp_path):
    """How far an unreadable epoch checkpoint is trained is unknown (a newer VISSL's types that a weights-only load
    refuses, a file a copy cut short): it may be the newest, so pruning keeps it, and the readable ones are pruned
    as usual."""
    from convit_ssl.run_folder import latest_checkpoint, prune_checkpoints

    for epoch in range(4):
        _write(tmp_path, f"model_phase{epoch}.torch", 10**18, iteration=10 * (epoch + 1))
    _write(tmp_path, "model_phase4.torch", 10**18)
    deleted = prune_checkpoints(tmp_path, keep_last=1, keep_every_epochs=0)
    assert sorted(p.name for p in deleted) == ["model_phase0.torch", "model_phase1.torch", "model_phase2.torch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_phase3.torch", "model_phase4.torch"]
    assert latest_checkpoint(tmp_path) == tmp_path / "model_phase3.torch"


@pytest.mark.slow
def test_training_keeps_the_last_and_milestone_checkpoints(tmp_path, train_env):
    run_dir = tmp_path / "run"
    command = train_command(run_dir, "config.OPTIMIZER.num_epochs=5", "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1",
                            "config.CHECKPOINT.KEEP_EVERY_N_EPOCHS=2")
    run(command, train_env)  # KEEP_LAST_N: 2 from the base config; epochs 2 and 4 are milestones
    assert sorted(p.name for p in run_dir.glob("model_*.torch")) == [
        "model_final_checkpoint_phase4.torch", "model_phase1.torch", "model_phase3.torch"]
    assert os.readlink(run_dir / "checkpoint.torch") == "model_final_checkpoint_phase4.torch"
    final = torch.load(run_dir / "checkpoint.torch", map_location="cpu", weights_only=True)
    assert final["iteration"] == 5 * 22


def test_retention_settings_are_checked(tmp_path, data_root, monkeypatch):
    from convit_ssl import engine
    from convit_ssl.errors import UsageError
    from tiny_training import TINY

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    for word, problem in (("KEEP_LAST_N=0", "keep at least 1"), ("KEEP_EVERY_N_EPOCHS=-5", "whole number")):
        with pytest.raises(UsageError, match=problem):
            engine.compose([*TINY, f"config.CHECKPOINT.{word}"], run_dir=str(tmp_path / "run"))
