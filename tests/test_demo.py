"""`convit-ssl demo`: its arguments, its plan, its tables, and its pretraining through `engine.train`."""
import json

import pytest

from convit_ssl import cli, engine
from convit_ssl.commands import demo
from convit_ssl.errors import UsageError
from tiny_training import TINY


def _rows():
    """Hand-made rows of two methods: SimCLR beats random init and its twin, DINO neither."""
    def row(method, trunk, linear, knn, **extra):
        return {"method": method, "trunk": trunk, "linear_top1": linear, "knn_top1": knn, "linear_feature": "lastCLS",
                "eval_s": 2.0, **extra}

    random = [row("random init", "ConViT", 83.0, 42.4), row("random init", "DeiT twin", 72.9, 22.6)]
    return [random[0], row("SimCLR", "ConViT", 87.25, 76.4, pretrain_s=241.04, beats_random_init=True, symptoms=[]),
            random[1], row("SimCLR", "DeiT twin", 76.7, 46.9, pretrain_s=238.0, beats_random_init=True, symptoms=[]),
            row("DINO", "ConViT", 77.1, 44.0, pretrain_s=300.0, beats_random_init=False,
                symptoms=["teacher is uniform", "feature std near 0"]),
            row("DINO", "DeiT twin", 78.0, 30.0, pretrain_s=290.0, beats_random_init=False, symptoms=[])]


def test_an_unknown_method_is_one_line_naming_the_choices(capsys):
    assert cli.main(["demo", "--method", "byol"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "invalid choice: 'byol'" in err and "simclr" in err and "barlow_twins" in err and "'all'" in err, err


def test_the_plan_trains_each_method_s_digits_recipe_with_both_trunks(tmp_path):
    everything = demo.plan([*demo.METHODS], "digits_val", tmp_path, None)
    assert list(everything) == ["simclr", "dino", "moco", "swav", "barlow_twins"]
    assert everything["moco"] == {
        "ConViT": ["config=digits_moco", "data=digits_val", f"run_dir={tmp_path / 'moco' / 'convit'}"],
        "DeiT twin": ["config=digits_moco", "data=digits_val", "trunk.local_up_to_layer=0",
                      f"run_dir={tmp_path / 'moco' / 'deit_twin'}"]}
    for method, (_, recipe) in demo.METHODS.items():
        assert recipe in engine.config_names() and recipe == f"digits_{method}"
    assert demo.plan(["swav"], "digits", tmp_path, 3)["swav"]["ConViT"][2] == "config.OPTIMIZER.num_epochs=3"


def test_bad_epochs_stop_in_one_line_before_any_folder_is_made(capsys, tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--method", "all", "--epochs", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "epoch" in err, err
    assert not out.exists()


def test_the_table_says_each_number_and_whether_it_beats_random_init_and_the_twin(tmp_path):
    rows = _rows()
    text = demo.write_tables(rows, tmp_path, "demo_methods", {"dataset": "digits"})
    lines = text.splitlines()
    assert lines[0] == ("| method | trunk | linear_top1 | knn_top1 | linear_feature | beats_random_init | pretrain_s "
                        "| eval_s | symptoms |")
    assert lines[2] == "| random init | ConViT | 83.00 | 42.40 | lastCLS |  |  | 2 |  |"
    assert lines[3] == "| SimCLR | ConViT | 87.25 | 76.40 | lastCLS | True | 241.04 | 2 |  |"
    assert lines[6] == ("| DINO | ConViT | 77.10 | 44.00 | lastCLS | False | 300 | 2 | teacher is uniform; feature "
                        "std near 0 |")
    assert lines[-2:] == [
        "SimCLR: the pretrained ConViT beats its random initialisation on both the linear probe and kNN, and beats "
        "its pretrained DeiT twin on both.",
        "DINO: the pretrained ConViT does NOT beat its random initialisation on both the linear probe and kNN, and "
        "does NOT beat its pretrained DeiT twin on both."]
    assert (tmp_path / "demo_methods.md").read_text() == text
    assert json.loads((tmp_path / "demo_methods.json").read_text()) == {"dataset": "digits", "rows": rows}


def test_the_table_of_methods_merges_the_methods_measured_in_separate_runs_into_one_out(tmp_path):
    """Two single-method demos (SimCLR, DINO) on the test split and one on digits_val into the same --out: the
    table of methods holds SimCLR's and DINO's rows, random init once per trunk, and names what is not measured."""
    rows = _rows()
    demo.write_tables(rows[:4], tmp_path / "simclr", "demo_results", {"dataset": "digits", "method": "simclr"})
    demo.write_tables([rows[0], rows[4], rows[2], rows[5]], tmp_path / "dino", "demo_results",
                      {"dataset": "digits", "method": "dino"})
    demo.write_tables(rows[:4], tmp_path / "moco", "demo_results", {"dataset": "digits_val", "method": "moco"})
    text = demo.write_method_tables(tmp_path, "digits")
    assert text == demo.write_tables(rows, tmp_path / "expected", "demo_methods", {})
    assert (tmp_path / "demo_methods.md").read_text() == text
    about = json.loads((tmp_path / "demo_methods.json").read_text())
    assert about["rows"] == rows and about["dataset"] == "digits"
    assert about["methods"] == {"simclr": "digits_simclr", "dino": "digits_dino"}
    assert about["not_measured"] == ["moco", "swav", "barlow_twins"]
    assert demo.write_method_tables(tmp_path, "cifar10") is None and (tmp_path / "demo_methods.md").read_text() == text


def test_a_damaged_method_result_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "swav").mkdir()
    (tmp_path / "swav" / "demo_results.json").write_text('{"dataset": "digits", "rows": [')
    with pytest.raises(UsageError, match=r"swav/demo_results.json is not a demo result .*: delete it and rerun "
                                         r"`convit-ssl demo --method swav`"):
        demo.write_method_tables(tmp_path, "digits")


def test_beats_needs_both_measures():
    baseline = {"linear_top1": 80.0, "knn_top1": 40.0}
    assert demo.beats({"linear_top1": 80.1, "knn_top1": 40.1}, baseline)
    assert not demo.beats({"linear_top1": 90.0, "knn_top1": 40.0}, baseline)
    assert not demo.beats({"linear_top1": 79.0, "knn_top1": 60.0}, baseline)


def test_progress_and_symptoms_come_from_the_run_folder(tmp_path):
    assert demo.epoch_progress(tmp_path, 30) == "starting"
    lines = [{"iteration": 17, "phase_idx": 0, "train_phase_idx": 0, "train_loss": 5.5, "train_loss_steps": 17},
             {"iteration": 34, "phase_idx": 1, "train_phase_idx": 1, "train_loss": 4.25, "train_loss_steps": 17}]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert demo.epoch_progress(tmp_path, 30) == "epoch 2/30, loss 4.2500"
    assert demo.run_symptoms(tmp_path) == []
    health = [{"iteration": 20, "symptoms": {"feature_std": "feature std near 0"}}, {"iteration": 40, "symptoms": {}},
              {"iteration": 60, "symptoms": {"uniform_teacher": "teacher is uniform", "feature_std": "feature std near 0"}}]
    (tmp_path / "health.jsonl").write_text("".join(json.dumps(record) + "\n" for record in health))
    assert demo.run_symptoms(tmp_path) == ["feature std near 0 (latest of 2 records, updates 20 to 60)",
                                           "teacher is uniform (update 60)"]


def _dino_collapse_records(legacy: bool):
    """Health records of a DINO run that logs its uniform teacher at 30 updates and a low rank at every other one,
    the numbers in each sentence changing; ``legacy``: symptoms as a list of sentences (health.jsonl before
    symptoms had kinds)."""
    records = []
    for i in range(1, 31):
        found = {"uniform_teacher": f"DINO loss {6.900 + i / 1000:.3f} is at ln(output_dim) = 6.931: uniform"}
        if i % 2:
            found["rank"] = f"effective rank {2 - i / 100:.2f} of 1024 dimensions: the features lie on a line"
        records.append({"iteration": 20 * i, "symptoms": list(found.values()) if legacy else found})
    return records


@pytest.mark.parametrize("legacy", [False, True])
def test_a_symptom_logged_at_many_updates_is_one_line_per_kind_with_its_latest_sentence(tmp_path, legacy):
    records = _dino_collapse_records(legacy)
    (tmp_path / "health.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    expected = ["DINO loss 6.930 is at ln(output_dim) = 6.931: uniform (latest of 30 records, updates 20 to 600)",
                "effective rank 1.71 of 1024 dimensions: the features lie on a line (latest of 15 records, updates "
                "20 to 580)"]
    assert demo.run_symptoms(tmp_path) == expected
    random, dino = _rows()[0], {**_rows()[4], "symptoms": expected}
    table = demo.write_tables([random, dino], tmp_path, "demo_results", {}).splitlines()
    assert table[3].endswith(" | " + "; ".join(expected) + " |")


@pytest.mark.slow
def test_pretraining_runs_through_engine_train_and_reports_from_the_run_folder(tmp_path, data_root, monkeypatch):
    """Two tiny one-epoch trainings side by side, each `engine.train` in its own process: both finish with a final
    checkpoint and one epoch's loss in metrics.json, and their wall times are recorded; a rerun trains nothing and
    keeps them; a finished run of another config is refused; a run whose folder another run holds fails, named; an
    interrupted demo leaves no training running."""
    from convit_ssl import run_folder

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    monkeypatch.setattr(demo, "POLL_S", 0.5)
    words = [*TINY, "config.OPTIMIZER.num_epochs=1"]
    configs = {label: engine.compose([*words, *trunk, f"run_dir={tmp_path / demo._slug(label)}"])
               for label, trunk in demo.TRUNKS.items()}
    wall = demo.pretraining_wall_times(configs, tmp_path)
    for label, config in configs.items():
        run_dir = tmp_path / demo._slug(label)
        assert run_folder.final_checkpoint(run_dir) is not None and demo.finished(config)
        assert 0 < wall[label] < 600
        assert demo.epoch_progress(run_dir, 1).startswith("epoch 1/1, loss ")
        assert "Starting phase 0 [train]" in (tmp_path / f"{demo._slug(label)}.log").read_text()
    assert json.loads((tmp_path / demo.WALL_TIMES).read_text()) == wall
    monkeypatch.setattr(demo, "pretrain_side_by_side", lambda *args: pytest.fail("a finished run trained again"))
    assert demo.pretraining_wall_times(configs, tmp_path) == wall
    longer = engine.compose([*TINY, "config.OPTIMIZER.num_epochs=2", f"run_dir={tmp_path / 'convit'}"])
    with pytest.raises(UsageError, match="holds a finished run of another config .*OPTIMIZER.num_epochs: 1 -> 2"):
        demo.finished(longer)
    monkeypatch.undo()

    monkeypatch.setenv("CONVIT_SSL_DATA", str(data_root))
    held = tmp_path / "held"
    config = engine.compose([*words, f"run_dir={held}"])
    with run_folder.owned(held):
        with pytest.raises(RuntimeError, match="pretraining of ConViT failed; end of .*convit.log") as failure:
            demo.pretrain_side_by_side({"ConViT": config}, tmp_path)
    assert f"run folder {held} is in use by pid" in str(failure.value), failure.value

    def interrupt(*args):  # Ctrl-C once the training holds its run folder
        if "pid" in (held / run_folder.LOCK_FILE).read_text():
            raise KeyboardInterrupt
        return "starting"

    monkeypatch.setattr(demo, "POLL_S", 0.5)
    monkeypatch.setattr(demo, "epoch_progress", interrupt)
    with pytest.raises(KeyboardInterrupt):
        demo.pretrain_side_by_side({"ConViT": config}, tmp_path)
    with run_folder.owned(held):  # no training is left running in it
        pass
