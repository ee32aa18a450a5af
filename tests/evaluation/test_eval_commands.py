"""linear-probe, knn, study and results from the command line: happy paths and one-line errors."""
import json
import re

import pytest
import torch

from convit_ssl.checkpoint import to_timm_state_dict
from convit_ssl.cli import main
from convit_ssl.evaluation.results import file_sha256
from payloads import CreatesFileWhenUnpickled

TINY_OPTIONS = ["--trunk-option", "patch_size=8", "--trunk-option", "embed_dim=48", "--trunk-option", "depth=3",
                "--trunk-option", "local_up_to_layer=2"]
QUICK = ["--epochs", "5", "--lrs", "0.3", "--wds", "0", "--features", "lastCLS+lastPOOL", "--no-cache", "--quiet"]


def results_in(folder):
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def test_probe_knn_and_results_from_a_checkpoint(digits_data, make_trunk, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": to_timm_state_dict(make_trunk())}, checkpoint)  # official/timm layout
    out = tmp_path / "eval"
    assert main(["linear-probe", "--checkpoint", str(checkpoint), "--out", str(out), "--cache", str(tmp_path / "c"),
                 "--epochs", "5", "--lrs", "0.1", "1.0", "--wds", "0", "--features", "lastCLS", "lastPOOL",
                 "--quiet"]) == 0
    (probe,) = results_in(out)
    model = probe["manifest"]["models"][0]
    assert model["source"] == "checkpoint" and model["sha256"] == file_sha256(checkpoint) and model["name"] == "tiny"
    assert probe["manifest"]["seeds"] == {"seed": 0} and probe["manifest"]["args"]["lrs"] == [0.1, 1.0]
    assert len(probe["grid"]) == 4 and probe["recipe"]["epochs"] == 5 and probe["trunk"]["unchanged"]
    printed = capsys.readouterr().out
    assert f"test top-1 {probe['chosen']['test_top1']:.2f}" in printed

    assert main(["knn", "--checkpoint", str(checkpoint), "--out", str(out), "--ks", "1", "20", "2000",
                 "--cache", str(tmp_path / "c"), "--quiet"]) == 0
    knn = next(result for result in results_in(out) if result["kind"] == "knn")
    assert knn["skipped_ks"] == [2000] and [row["k"] for row in knn["rows"]] == [1, 20]
    assert knn["rows"][0]["top1"] == knn["rows"][0]["top5"] and knn["rows"][1]["top1"] > 20  # chance: 10
    assert "skipped k = 2000" in capsys.readouterr().out

    assert main(["results", str(out), "--csv", str(tmp_path / "all.csv")]) == 0
    table = capsys.readouterr().out
    assert f"| {probe['chosen']['test_top1']:.2f} |" in table and f"| {knn['rows'][1]['top1']:.2f} |" in table
    assert len((tmp_path / "all.csv").read_text().splitlines()) == 1 + 1 + 2


def test_random_trunk_probe_with_a_label_fraction(digits_data, tmp_path):
    out = tmp_path / "eval"
    assert main(["linear-probe", "--random", "convit_tiny", *TINY_OPTIONS, "--fraction", "0.1", "--seed", "2",
                 "--batch-size", "5000", "--out", str(out), *QUICK]) == 0  # a batch larger than the dataset
    (probe,) = results_in(out)
    assert probe["recipe"]["batch_size"] == 5000 and probe["chosen"]["test_top1"] > 0
    model = probe["manifest"]["models"][0]
    assert model["source"] == "random" and model["options"]["img_size"] == 32 and model["init_seed"] == 2
    assert probe["dataset"]["fraction"] == 0.1 and probe["dataset"]["train"] + probe["dataset"]["heldout"] == 139


@pytest.mark.slow
def test_study_command(digits_data, tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.setattr(time, "strftime", lambda fmt, *when: "20261201-120000")  # both studies in the same second
    assert main(["study", "low-data", *TINY_OPTIONS, "--fractions", "0.1", "1", "--out", str(tmp_path), *QUICK]) == 0
    (folder,) = tmp_path.iterdir()
    assert {"study.md", "study.csv", "low_data.png", "probe-ConViT-random-f0.1.json", "probe-DeiT-random-f1.json"} <= {
        path.name for path in folder.iterdir()}
    assert "| fraction | init | top1 ConViT | top1 DeiT | gain top1 (%) |" in capsys.readouterr().out
    assert main(["study", "low-data", *TINY_OPTIONS, "--fractions", "1", "--out", str(tmp_path), *QUICK]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == [folder.name, f"{folder.name}-2"]
    assert (folder / "probe-ConViT-random-f0.1.json").is_file()  # the first study's results are still there


def one_line_error(capsys, command):
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith(f"convit-ssl {command}: error: "), error
    return error


@pytest.mark.parametrize("command", ["linear-probe", "knn"])
def test_errors_are_one_line_and_name_the_fix(digits_data, tmp_path, capsys, command):
    base = [command, "--out", str(tmp_path), "--no-cache", "--quiet"]
    not_torch = tmp_path / "notes.txt"
    not_torch.write_text("hello")
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3)}, foreign)
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": {}, "args": CreatesFileWhenUnpickled(tmp_path / "payload_ran")}, hostile)
    (tmp_path / "empty").mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "empty")], r"empty is a folder, not a checkpoint file, and holds no checkpo"),
        (["--checkpoint", str(hostile)], r"hostile.pth was refused, nothing in it was run: its pickle needs io.open"),
        (["--checkpoint", str(tmp_path / "nope.pth")], r"checkpoint .*nope.pth does not exist: pass the path"),
        (["--checkpoint", str(not_torch)], r"cannot be read by torch.load"),
        (["--checkpoint", str(foreign)], r"not a ConViT/DeiT state dict: no patch_embed.proj.weight"),
        (["--random", "convit_tiny", "--data", "imagenet1k"], r"unknown dataset 'imagenet1k'.*prepare-data imagenet1k"),
        (["--random", "convit_tiny", "--data", "mydata"], r"no recipe is named like dataset 'mydata': pass --recipe"),
        (["--random", "convit_tiny", "--recipe", "imagenet"], r"unknown recipe 'imagenet'; known: cifar10"),
        (["--random", "convit_tiny", *TINY_OPTIONS, "--features", "lastFOO"], r"unknown feature key 'lastFOO'"),
        (["--random", "convit_tiny", "--trunk-option", "patch_size"], r"--trunk-option 'patch_size' is not KEY=VALUE"),
        (["--random", "convit_tiny", "--network", "student"], r"--network student chooses a network of a --checkpoint"),
        (["--random", "convit_huge"], r"unknown arch 'convit_huge'; known presets"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert re.search(message, one_line_error(capsys, command)), extra
    assert not list(tmp_path.glob("*.json"))  # nothing written for a failed command
    assert not (tmp_path / "payload_ran").exists()


@pytest.mark.parametrize("command", ["linear-probe", "knn", "study"])
def test_a_fraction_that_keeps_no_image_is_refused_before_any_work(digits_data, tmp_path, capsys, monkeypatch,
                                                                    command):
    def extract(*args, **kwargs):
        raise AssertionError("features were extracted before the label subset was checked")

    monkeypatch.setattr("convit_ssl.evaluation.features.extract", extract)
    # digits' largest training class holds 146 images: int(146 * 0.005) = 0, the 'first' rule keeps no image
    argv = ([command, "low-data", "--fractions", "0.1", "0.005"] if command == "study"
            else [command, "--random", "convit_tiny", *TINY_OPTIONS, "--fraction", "0.005"])
    assert main([*argv, "--subset-rule", "first", "--out", str(tmp_path / "out"), "--no-cache", "--quiet"]) == 2
    assert re.search(r"label fraction 0.005 keeps no training image under the 'first' rule .*at least 1/146",
                     one_line_error(capsys, command))
    assert not (tmp_path / "out").exists()  # no results folder either


def test_a_pickle_payload_given_to_study_is_refused_not_run(digits_data, make_trunk, tmp_path, capsys):
    good, hostile = tmp_path / "convit.pth", tmp_path / "hostile.pth"
    torch.save(make_trunk().state_dict(), good)
    torch.save({"model": {}, "args": CreatesFileWhenUnpickled(tmp_path / "payload_ran")}, hostile)
    for pair in ([good, hostile], [hostile, good]):
        assert main(["study", "low-data", "--checkpoints", *map(str, pair), "--out", str(tmp_path / "out"),
                     "--no-cache", "--quiet"]) == 2
        assert "hostile.pth was refused, nothing in it was run" in one_line_error(capsys, "study")
    assert not (tmp_path / "payload_ran").exists() and not (tmp_path / "out").exists()


def test_results_without_results(tmp_path, capsys):
    assert main(["results", str(tmp_path)]) == 2
    assert "no result rows in" in one_line_error(capsys, "results")
    assert main(["results", str(tmp_path / "missing")]) == 2
    assert "does not exist" in one_line_error(capsys, "results")


@pytest.mark.slow
def test_study_of_two_checkpoints(digits_data, make_trunk, tmp_path, capsys):
    paths = []
    for name, local in (("convit", 2), ("deit", 0)):
        paths.append(tmp_path / f"{name}.pth")
        torch.save({"model": to_timm_state_dict(make_trunk(local_up_to_layer=local))}, paths[-1])
    base = ["study", "low-data", "--checkpoints", *map(str, paths), "--fractions", "1", "--out", str(tmp_path), *QUICK]
    assert main(base) == 2  # the twin's head count is not in its weights
    assert "pass num_heads=" in one_line_error(capsys, "study")
    assert main([*base, "--trunk-option", "num_heads=4"]) == 0
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    models = json.loads((folder / "study.json").read_text())["manifest"]["models"]
    assert [(m["name"], m["sha256"]) for m in models] == [("ConViT", file_sha256(paths[0])),
                                                         ("DeiT", file_sha256(paths[1]))]

    assert main([*base, "--trunk-option", "num_heads=4", "--random-init"]) == 0  # the same table, random init added
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir() and path != folder]
    study = json.loads((folder / "study.json").read_text())
    assert [row["init"] for row in study["table"]] == ["checkpoint", "random"]
    random_models = study["manifest"]["models"][2:]
    assert [(m["source"], m["options"]["local_up_to_layer"], m["options"]["num_heads"]) for m in random_models] == [
        ("random", 2, 4), ("random", 0, 4)]


def test_random_init_needs_checkpoints(empty_data, tmp_path, capsys):
    assert main(["study", "low-data", "--random-init", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "--random-init adds random trunks beside --checkpoints" in one_line_error(capsys, "study")
    assert not empty_data.exists() and not (tmp_path / "out").exists()


def _vissl_run(folder, trunk):
    """A run folder as VISSL leaves it: the final checkpoint and checkpoint.torch linking to it."""
    folder.mkdir(parents=True)
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk.state_dict()}}}},
               folder / "model_final_checkpoint_phase1.torch")
    (folder / "checkpoint.torch").symlink_to("model_final_checkpoint_phase1.torch")
    return folder


@pytest.mark.slow
def test_results_of_runs_are_labelled_by_run_and_checkpoint_and_never_collide(digits_data, make_trunk, tmp_path,
                                                                               capsys, monkeypatch):
    import time

    run_a = _vissl_run(tmp_path / "runs" / "dino_a", make_trunk(seed=1))
    run_b = _vissl_run(tmp_path / "runs" / "dino_b", make_trunk(seed=2))
    out = tmp_path / "eval"
    monkeypatch.setattr(time, "strftime", lambda fmt, *when: "20261201-120000")  # every run in the same second
    knn = ["knn", "--ks", "5", "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet"]
    for source in (run_a / "checkpoint.torch", run_b / "checkpoint.torch", run_a / "checkpoint.torch", run_b):
        assert main([*knn, "--checkpoint", str(source)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert (f"{run_b} is a run folder: using its latest checkpoint {run_b / 'checkpoint.torch'} -> "
            f"model_final_checkpoint_phase1.torch") in printed
    results = {path.name: json.loads(path.read_text()) for path in out.glob("*.json")}
    assert len(results) == 4  # same file name, same second, even the same checkpoint twice: nothing lost
    labels = sorted(result["rows"][0]["model"] for result in results.values())
    assert labels == ["dino_a/model_final_checkpoint_phase1"] * 2 + ["dino_b/model_final_checkpoint_phase1"] * 2
    for name, result in results.items():
        model = result["manifest"]["models"][0]
        assert name.startswith(f"knn-{model['run']}-model_final_checkpoint_phase1-digits-f1-"), name
        assert result["trunk"]["sha256_before"][:8] in name
        assert model["file"] == str(tmp_path / "runs" / model["run"] / "model_final_checkpoint_phase1.torch")
    assert main(["results", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("| dino_a/model_final_checkpoint_phase1 |") == 2
    assert table.count("| dino_b/model_final_checkpoint_phase1 |") == 2


BAD_NUMBERS = [
    ("linear-probe", ["--epochs", "0"], r"--epochs 0 must be >= 1"),
    ("linear-probe", ["--epochs", "-1"], r"--epochs -1 must be >= 1"),
    ("linear-probe", ["--batch-size", "0"], r"--batch-size 0 must be >= 1"),
    ("linear-probe", ["--lrs", "0.1", "-1"], r"--lrs -1 must be > 0"),
    ("linear-probe", ["--lrs", "0"], r"--lrs 0 must be > 0"),
    ("linear-probe", ["--wds", "0", "-0.001"], r"--wds -0.001 must be >= 0"),
    ("linear-probe", ["--heldout-fraction", "1"], r"--heldout-fraction 1 must be in \[0, 1\)"),
    ("linear-probe", ["--image-size", "0"], r"--image-size 0 must be >= 1"),
    ("linear-probe", ["--fraction", "0"], r"--fraction 0 must be in \(0, 1\]"),
    ("linear-probe", ["--workers", "-1"], r"--workers -1 must be >= 0"),
    ("linear-probe", ["--threads", "0"], r"--threads 0 must be >= 1"),
    ("knn", ["--ks", "20", "0"], r"--ks 0 must be >= 1"),
    ("knn", ["--ks", "-5"], r"--ks -5 must be >= 1"),
    ("knn", ["--temperature", "0"], r"--temperature 0 must be > 0"),
    ("knn", ["--batch-size", "-2"], r"--batch-size -2 must be >= 1"),
    ("knn", ["--fraction", "1.5"], r"--fraction 1.5 must be in \(0, 1\]"),
    ("study", ["--knn", "--ks", "0"], r"--ks 0 must be >= 1"),
    ("study", ["--lrs", "-1"], r"--lrs -1 must be > 0"),
    ("study", ["--epochs", "0"], r"--epochs 0 must be >= 1"),
    ("study", ["--finetune", "0"], r"--finetune 0 must be >= 1"),
    ("study", ["--fractions", "0.1", "0"], r"--fractions 0 must be in \(0, 1\]"),
]


@pytest.mark.parametrize("command,extra,message", BAD_NUMBERS, ids=[" ".join(case[:2][1]) + f" ({case[0]})"
                                                                       for case in BAD_NUMBERS])
def test_bad_numbers_are_refused_before_any_work(empty_data, tmp_path, capsys, command, extra, message):
    source = [] if command == "study" else ["--random", "convit_tiny"]
    argv = [command, "low-data"] if command == "study" else [command]
    assert main([*argv, *source, *extra, "--out", str(tmp_path / "out"), "--no-cache", "--quiet"]) == 2
    assert re.search(message, one_line_error(capsys, command))
    assert not empty_data.exists() and not (tmp_path / "out").exists()  # no dataset made, nothing written


def test_a_bad_recipe_file_names_the_field(empty_data, tmp_path, capsys):
    from convit_ssl.evaluation.linear_probe import RECIPE_DIR

    recipe = tmp_path / "mine.yaml"
    recipe.write_text((RECIPE_DIR / "digits.yaml").read_text().replace("wds:", "wds: [-0.5] #"))
    assert main(["linear-probe", "--random", "convit_tiny", "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "recipe mine.yaml: wds -0.5 must be >= 0" in one_line_error(capsys, "linear-probe")
