"""The command line: help, one-line errors before any work, export-timm."""
import os
from types import SimpleNamespace

import pytest
import timm
import torch

from convit_ssl import cli, create_trunk
from payloads import CreatesFileWhenUnpickled


def _error(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("bug", [ValueError("a genuine bug"), FileNotFoundError("a path the code got wrong")])
def test_a_bug_keeps_its_traceback_and_a_usage_error_is_one_line(capsys, monkeypatch, bug):
    from convit_ssl.commands import results
    from convit_ssl.errors import UsageError

    def run(args):
        raise bug

    monkeypatch.setattr(results, "run", run)
    with pytest.raises(type(bug), match=str(bug)):
        cli.main(["results", "somewhere"])
    monkeypatch.setattr(results, "run", lambda args: (_ for _ in ()).throw(UsageError("bad input: pass good input")))
    assert _error(capsys, "results", "somewhere") == "convit-ssl results: error: bad input: pass good input"


@pytest.mark.parametrize("argv, message", [
    (["bogus"], "convit-ssl: error: unknown command 'bogus'; choose from train, "),
    (["linear-probe", "--random", "convit_tiny", "--lrs", "abc"],
     "convit-ssl linear-probe: error: argument --lrs: invalid float value: 'abc' (see convit-ssl linear-probe --help)"),
    (["knn", "--ks", "5"], "convit-ssl knn: error: one of the arguments --checkpoint --random is required (see "),
    (["export-timm", "only-one"], "convit-ssl export-timm: error: the following arguments are required: out (see "),
])
def test_command_line_mistakes_are_one_line_without_the_usage(capsys, argv, message):
    assert message in _error(capsys, *argv)


def test_unknown_config_lists_close_matches(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CONVIT_SSL_DATA", str(tmp_path))
    err = _error(capsys, "train", "config=dinno")
    assert "unknown config 'dinno'" in err and "looked in" in err and "close matches: dino" in err


def test_unknown_preset(capsys):
    err = _error(capsys, "train", "config=dino", "model=convit_huge")
    assert "unknown model 'convit_huge'; choose from" in err and "convit_tiny" in err


def test_missing_dataset_is_named(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CONVIT_SSL_DATA", str(tmp_path))
    err = _error(capsys, "train", "config=dino", "data=imagenet1k", f"run_dir={tmp_path / 'run'}")
    assert "unknown dataset 'imagenet1k'" in err and "convit-ssl prepare-data imagenet1k --from PATH" in err


def test_trunk_head_dimension_mismatch(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CONVIT_SSL_DATA", str(tmp_path))
    err = _error(capsys, "train", "config=dino", "data=digits", "config.MODEL.TRUNK.CONVIT_SSL.EMBED_DIM=768",
                 f"run_dir={tmp_path / 'run'}")
    assert "trunk/head dimension mismatch" in err and "432 wide" in err and "EMBED_DIM=768" in err


def test_config_that_does_not_compose(capsys, tmp_path):
    err = _error(capsys, "train", "config=dino", "config.OPTIMIZER.no_such_key=1", f"run_dir={tmp_path / 'run'}")
    assert "does not compose" in err and "no_such_key" in err


def test_export_timm_from_vissl_checkpoint(capsys, tmp_path):
    trunk = create_trunk("convit_tiny", img_size=64)
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk.state_dict()}}}}, tmp_path / "ck.torch")
    assert cli.main(["export-timm", str(tmp_path / "ck.torch"), str(tmp_path / "out.pth")]) == 0
    model = timm.create_model("convit_tiny", img_size=64)
    missing = model.load_state_dict(torch.load(tmp_path / "out.pth"), strict=False).missing_keys
    assert missing == ["head.weight", "head.bias"]


def test_export_timm_of_a_dino_runs_student(capsys, tmp_path):
    student, teacher = create_trunk("convit_tiny", img_size=64), create_trunk("convit_tiny", img_size=64)
    loss = {f"momentum_teacher.trunk.{key}": value for key, value in teacher.state_dict().items()}
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": student.state_dict()}}, "loss": loss}},
               tmp_path / "ck.torch")
    assert cli.main(["export-timm", str(tmp_path / "ck.torch"), str(tmp_path / "out.pth"), "--network", "student"]) == 0
    assert "the DINO student" in capsys.readouterr().out
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert torch.equal(exported["pos_embed"], student.pos_embedding)
    assert "invalid choice: 'teacher'" in _error(capsys, "export-timm", str(tmp_path / "ck.torch"),
                                                 str(tmp_path / "o.pth"), "--network", "teacher")


def test_export_timm_of_missing_or_foreign_file(capsys, tmp_path):
    assert "does not exist" in _error(capsys, "export-timm", str(tmp_path / "nope.torch"), str(tmp_path / "o.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    assert "not a ConViT/DeiT state dict" in _error(capsys, "export-timm", str(tmp_path / "resnet.pth"),
                                                     str(tmp_path / "o.pth"))


@pytest.mark.parametrize("command", [["export-timm", "{checkpoint}", "{tmp}/out.pth"],
                                     ["report", "{checkpoint}", "--out", "{tmp}/report"]])
def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(capsys, tmp_path, command):
    marker = tmp_path / "payload_ran"
    checkpoint = tmp_path / "model.torch"
    torch.save({"model": create_trunk("convit_tiny", img_size=64).state_dict(),
                "args": CreatesFileWhenUnpickled(marker)}, checkpoint)
    err = _error(capsys, *(part.format(checkpoint=checkpoint, tmp=tmp_path) for part in command))
    assert "was refused, nothing in it was run: its pickle needs io.open" in err and str(checkpoint) in err
    assert not marker.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["model.torch"]


def _vissl_checkpoint(path):
    """A VISSL training checkpoint of a convit_tiny trunk at ``path``."""
    trunk = create_trunk("convit_tiny", img_size=64)
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk.state_dict()}}}}, path)
    return path


def test_export_timm_never_overwrites_its_input(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    final = _vissl_checkpoint(run / "model_final_checkpoint_phase1.torch")
    (run / "checkpoint.torch").symlink_to(final.name)
    (run / "train_config.yaml").write_text("MODEL: {}\n")
    os.link(final, tmp_path / "hard_link.torch")
    before = {path: path.read_bytes() for path in run.iterdir()}
    link = run / "checkpoint.torch"
    for source, out in [(final, final), (link, link), (link, final), (final, link), (run, link),
                        (final, tmp_path / "hard_link.torch"), (final, run / "train_config.yaml")]:
        err = _error(capsys, "export-timm", str(source), str(out))
        assert f"output {out} is an input of the export" in err and "pass another output path" in err, err
    assert {path: path.read_bytes() for path in run.iterdir()} == before and link.is_symlink()
    err = _error(capsys, "export-timm", str(final), str(run))
    assert f"output {run} is a folder: pass a file name for the output" in err


def test_export_timm_of_a_run_folder_says_which_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _vissl_checkpoint(run / "model_final_checkpoint_phase1.torch")
    assert cli.main(["export-timm", str(run), str(tmp_path / "out.pth")]) == 0
    out = capsys.readouterr().out
    assert f"{run} is a run folder: using its latest checkpoint {run / 'model_final_checkpoint_phase1.torch'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth", "run"]


def test_evaluations_after_pretraining_are_labelled_by_run_and_checkpoint(tmp_path, monkeypatch):
    from convit_ssl import launch
    from convit_ssl.evaluation.arguments import checkpoint_label

    run = tmp_path / "dino_tiny"
    run.mkdir()
    final = run / "model_final_checkpoint_phase1.torch"
    final.write_bytes(b"")
    (run / "checkpoint.torch").symlink_to(final.name)
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    job_folder = tmp_path / "job"
    one_task = SimpleNamespace(paths=SimpleNamespace(folder=job_folder), num_tasks=1, global_rank=0)
    monkeypatch.setattr("submitit.JobEnvironment", lambda: one_task)
    launch.EvaluationJob("knn", ["--ks", "5"], cpu=True, run_dir=str(run))()
    (argv,) = calls
    assert argv == ["knn", "--checkpoint", str(final), "--ks", "5", "--out", str(job_folder), "--device", "cpu"]
    label = "dino_tiny/model_final_checkpoint_phase1"
    assert checkpoint_label(final) == checkpoint_label(run / "checkpoint.torch") == label
