"""Result files: manifest, atomic JSON, gathering rows from folders, Markdown and CSV."""
import csv
import hashlib
import io
import json
import time

import torch

from convit_ssl.evaluation.results import (
    SCHEMA, csv_text, file_sha256, gather, make_manifest, markdown_table, read_result, write_result,
)


def test_manifest_records_where_numbers_come_from(tmp_path, monkeypatch):
    checkpoint = tmp_path / "trunk.pth"
    torch.save({"w": torch.arange(5.0)}, checkpoint)
    assert file_sha256(checkpoint) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    monkeypatch.setenv("WORLD_SIZE", "4")
    model = {"name": "tiny", "checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint)}
    manifest = make_manifest([model], {"out": tmp_path, "lrs": [0.1], "run": print}, {"seed": 3}, time.time() - 2)
    assert manifest["models"] == [model] and manifest["seeds"] == {"seed": 3} and manifest["world_size"] == 4
    assert manifest["args"] == {"out": str(tmp_path), "lrs": [0.1]}  # paths as text, callables dropped
    assert manifest["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {"torchvision", "vissl", "timm", "convit-ssl"} <= set(manifest["versions"])
    assert 2 <= manifest["wall_time_s"] < 60


def test_gather_reads_result_files_only_and_tables_show_them(tmp_path):
    rows_a = [{"kind": "linear_probe", "model": "a", "dataset": "digits", "feature": "lastCLS", "lr": 0.1,
               "top1": 81.25, "top5": 99.0}]
    rows_b = [{"kind": "knn", "model": "b", "dataset": "digits", "k": k, "temperature": 0.07, "top1": 70.0 + k,
               "top5": 95.5} for k in (10, 20)]
    write_result({"kind": "linear_probe", "rows": rows_a}, tmp_path / "x" / "probe.json")
    write_result({"kind": "knn", "rows": rows_b}, tmp_path / "y" / "deeper" / "knn.json")
    (tmp_path / "x" / "other.json").write_text(json.dumps({"rows": [{"top1": 1.0}]}))  # not ours: ignored
    (tmp_path / "x" / "broken.json").write_text("{")
    assert read_result(tmp_path / "x" / "probe.json")["schema"] == SCHEMA
    assert not list(tmp_path.rglob("*.tmp"))

    rows = gather([tmp_path])
    assert [(row["model"], row.get("k")) for row in rows] == [("a", None), ("b", 10), ("b", 20)]
    assert rows[0]["file"] == str(tmp_path / "x" / "probe.json")
    table = markdown_table(rows).splitlines()
    assert table[0] == "| kind | model | dataset | feature | k | temperature | lr | top1 | top5 | file |"
    assert table[2].startswith("| linear_probe | a | digits | lastCLS |  |  | 0.1 | 81.25 | 99.00 |")
    assert table[4].startswith("| knn | b | digits |  | 20 | 0.07 |  | 90.00 | 95.50 |")
    parsed = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert [float(row["top1"]) for row in parsed] == [81.25, 80.0, 90.0]
    assert gather([tmp_path / "y" / "deeper" / "knn.json"]) == rows[1:]


def test_new_result_files_never_replace_one(tmp_path):
    from convit_ssl.evaluation.results import new_folder, write_new_result

    (tmp_path / "knn-a.json").write_text("someone's file")
    paths = [write_new_result({"kind": "knn", "rows": [{"top1": float(i)}]}, tmp_path, "knn-a") for i in range(3)]
    assert [path.name for path in paths] == ["knn-a-2.json", "knn-a-3.json", "knn-a-4.json"]
    assert (tmp_path / "knn-a.json").read_text() == "someone's file"
    assert [read_result(path)["rows"][0]["top1"] for path in paths] == [0.0, 1.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn-a-2.json", "knn-a-3.json", "knn-a-4.json", "knn-a.json"]
    folders = [new_folder(tmp_path, "study") for _ in range(2)]
    assert [folder.name for folder in folders] == ["study", "study-2"] and all(f.is_dir() for f in folders)


def test_gather_skips_folders_and_names_a_file_it_cannot_read(tmp_path, capsys):
    from convit_ssl.cli import main

    write_result({"kind": "knn", "rows": [{"model": "a", "top1": 50.0}]}, tmp_path / "knn.json")
    (tmp_path / "old.json").mkdir()  # a folder named like a result: not one
    assert [row["model"] for row in gather([tmp_path])] == ["a"]
    (tmp_path / "moved.json").symlink_to(tmp_path / "elsewhere" / "knn.json")  # its target is gone
    assert main(["results", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith("convit-ssl results: error: cannot read "
                                                                     f"{tmp_path / 'moved.json'} (")
