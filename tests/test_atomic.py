"""convit_ssl.atomic: a written file is complete or absent; create_new never replaces a file."""
import json
import os

import pytest
import torch

from convit_ssl import atomic


def test_torch_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.pth"
    atomic.torch_save({"a": torch.ones(2)}, target)

    def failing_save(obj, stream):
        stream.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic.torch_save({"a": torch.zeros(2)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out.pth"]


def test_write_text_and_json_replace_the_file_and_create_its_folder(tmp_path):
    target = tmp_path / "new" / "folder" / "result.json"
    atomic.write_text("old", target)
    atomic.write_json({"top1": 12.5, "rows": [1, 2]}, target)
    assert json.loads(target.read_text()) == {"top1": 12.5, "rows": [1, 2]}
    assert target.read_text().endswith("\n")
    assert os.listdir(target.parent) == ["result.json"]


def test_open_atomic_keeps_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "table.md"
    target.write_text("kept")
    with pytest.raises(KeyError):
        with atomic.open_atomic(target) as stream:
            stream.write("half a table")
            raise KeyError("a bug in the writer")
    assert target.read_text() == "kept"
    assert os.listdir(tmp_path) == ["table.md"]


def test_create_new_takes_the_first_free_name_and_replaces_none(tmp_path):
    (tmp_path / "a.json").write_text("first")
    names = [tmp_path / "a.json", tmp_path / "a-2.json", tmp_path / "a-3.json"]
    assert atomic.create_new("second", names) == tmp_path / "a-2.json"
    assert atomic.create_new("third", names) == tmp_path / "a-3.json"
    assert [(tmp_path / n).read_text() for n in ("a.json", "a-2.json", "a-3.json")] == ["first", "second", "third"]
    with pytest.raises(FileExistsError, match="a-3.json"):
        atomic.create_new("fourth", names)
    assert sorted(os.listdir(tmp_path)) == ["a-2.json", "a-3.json", "a.json"]


def test_replace_symlink_points_the_link_at_the_new_target(tmp_path):
    link = tmp_path / "checkpoint.torch"
    atomic.replace_symlink("model_phase0.torch", link)
    atomic.replace_symlink("model_phase1.torch", link)
    assert os.readlink(link) == "model_phase1.torch"
    assert os.listdir(tmp_path) == ["checkpoint.torch"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask):
    """As open() would give them: a run folder shared with a group stays readable by it (mkstemp alone gives 0600)."""
    previous = os.umask(umask)
    try:
        written = [atomic.write_text("a", tmp_path / "a.txt"), atomic.create_new("b", [tmp_path / "b.json"]),
                   atomic.torch_save({"a": torch.ones(1)}, tmp_path / "a.pth")]
    finally:
        os.umask(previous)
    assert {oct(path.stat().st_mode & 0o777) for path in written} == {oct(0o666 & ~umask)}
