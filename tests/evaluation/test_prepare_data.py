"""prepare-data: CIFAR archives in the real pickle format, image folders in place, one-line errors."""
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from convit_ssl import data
from convit_ssl.cli import main
from convit_ssl.datasets.folders import DONE_FILE

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def batch(rng, count, label_key, num_classes):
    """A batch file as the real archives hold it: byte keys, (N, 3072) uint8 rows, R then G then B planes.

    Labels cycle through every class from a random start, so each class has an image once count >= num_classes.
    """
    labels = ((np.arange(count) + rng.integers(num_classes)) % num_classes).tolist()
    return {b"batch_label": b"test batch", b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
            label_key: labels, b"filenames": [f"img_{i}.png".encode() for i in range(count)]}


def py2_pickle(obj):
    """``obj`` (dicts, lists, tuples, ints, bytes, None, uint8 arrays) as Python 2's cPickle wrote the real archives:
    byte strings as STRING opcodes, arrays through numpy.core.multiarray._reconstruct."""
    def dump(value):
        if value is None or isinstance(value, bool):
            return {None: b"N", True: b"\x88", False: b"\x89"}[value]
        if isinstance(value, int):
            return b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value)
        if isinstance(value, bytes):  # a Python 2 str
            return (b"U" + bytes([len(value)]) if len(value) < 256 else b"T" + struct.pack("<I", len(value))) + value
        if isinstance(value, tuple):
            return b"(" + b"".join(map(dump, value)) + b"t"
        if isinstance(value, list):
            return b"](" + b"".join(map(dump, value)) + b"e"
        if isinstance(value, dict):
            return b"}(" + b"".join(dump(key) + dump(item) for key, item in value.items()) + b"u"
        assert value.dtype == np.uint8
        dtype = b"cnumpy\ndtype\n" + dump((b"u1", False, True)) + b"R" + dump((3, b"|", None, None, None, -1, -1, 0))
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + dump((0,)) + dump(b"b") + b"\x87R("
                + dump(1) + dump(value.shape) + dtype + b"b" + dump(False) + dump(value.tobytes()) + b"tb")
    return b"\x80\x02" + dump(obj) + b"."


def write_archive(path, folder, members, dumps=lambda content: pickle.dumps(content, protocol=2)):
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            payload = dumps(content)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def run_cli(*argv):
    return main(["prepare-data", *map(str, argv), "--quiet"])


def test_cifar10_archive_becomes_png_folders(empty_data, tmp_path):
    rng = np.random.default_rng(0)
    batches = {"data_batch_1": batch(rng, 10, b"labels", 10), "data_batch_2": batch(rng, 6, b"labels", 10),
               "test_batch": batch(rng, 10, b"labels", 10)}
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py",
                            {**batches, "batches.meta": {b"label_names": CIFAR10_NAMES, b"num_vis": 3072}})
    assert run_cli("tiny10", "--from", archive) == 0

    catalog = data.read_catalog()["tiny10"]
    train = ImageFolder(catalog["train"][0])
    assert train.classes[:3] == ["0_airplane", "1_automobile", "2_bird"] and len(train.classes) == 10
    assert len(train) == 16 and len(ImageFolder(catalog["val"][0])) == 10
    expected = batches["data_batch_2"]
    for path, label in train.samples:
        name = path.rsplit("/", 1)[1]
        if name.startswith("data_batch_2_00003"):
            assert label == expected[b"labels"][3]  # ImageFolder's label is CIFAR's label
            pixels = np.asarray(Image.open(path))
            assert np.array_equal(pixels, expected[b"data"][3].reshape(3, 32, 32).transpose(1, 2, 0))
    assert run_cli("tiny10", "--from", archive) == 0  # again: kept as it is, registered again


def test_python2_pickles_as_in_the_real_archives(empty_data, tmp_path):
    rng = np.random.default_rng(6)
    batches = {"data_batch_1": batch(rng, 12, b"labels", 10), "test_batch": batch(rng, 10, b"labels", 10)}
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py",
                            {**batches, "batches.meta": {b"label_names": CIFAR10_NAMES, b"num_vis": 3072}}, py2_pickle)
    assert b"numpy.core.multiarray" in py2_pickle(batches["test_batch"])
    assert run_cli("py2", "--from", archive) == 0
    val = ImageFolder(data.read_catalog()["py2"]["val"][0])
    assert [label for _, label in val.samples] == sorted(batches["test_batch"][b"labels"])
    path, label = val.samples[0]
    index = int(path[-9:-4])  # test_batch_00007.png
    assert label == batches["test_batch"][b"labels"][index]
    assert np.array_equal(np.asarray(Image.open(path)),
                          batches["test_batch"][b"data"][index].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar100_extracted_folder_uses_fine_labels(empty_data, tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "extracted" / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class{i}".encode() for i in range(100)]
    content = {"train": batch(rng, 100, b"fine_labels", 100), "test": batch(rng, 100, b"fine_labels", 100),
               "meta": {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}}
    for name, value in content.items():
        (folder / name).write_bytes(pickle.dumps(value, protocol=2))
    assert run_cli("tiny100", "--from", tmp_path / "extracted", "--out", tmp_path / "pngs") == 0
    train = ImageFolder(str(tmp_path / "pngs" / "train"))
    assert train.classes[7] == "07_class7" and len(train.classes) == 100
    by_index = sorted(train.samples, key=lambda sample: sample[0].rsplit("/", 1)[1])  # train_00000.png, ...
    assert [label for _, label in by_index] == content["train"][b"fine_labels"]
    assert data.dataset_split_dir("tiny100", "val") == tmp_path / "pngs" / "val"


def test_incomplete_cifar_archive_is_refused(empty_data, tmp_path, capsys):
    rng = np.random.default_rng(2)
    archive = write_archive(tmp_path / "cut.tar.gz", "cifar-10-batches-py", {
        "data_batch_1": batch(rng, 10, b"labels", 10), "test_batch": batch(rng, 4, b"labels", 10),
        "batches.meta": {b"label_names": CIFAR10_NAMES}})
    assert run_cli("cut", "--from", archive) == 2
    assert "the val split has no image of class(es)" in capsys.readouterr().err
    assert not (empty_data / "cut").exists() and not list(empty_data.glob(".cut*"))  # nothing written


def make_image_folder(root, classes=("cat", "dog"), val_classes=None):
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "a.png")
    return root


def test_image_folder_is_registered_in_place(empty_data, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "pets")
    assert run_cli("pets", "--from", folder) == 0
    assert "registered pets (image folder)" in capsys.readouterr().out
    assert data.read_catalog()["pets"]["train"] == [str(folder / "train")] * 2
    assert sorted(p.name for p in empty_data.iterdir()) == [".catalog.lock", "dataset_catalog.json",
                                                            "dataset_manifest.json"]  # no copy


@pytest.mark.parametrize("setup, message", [
    (lambda tmp: tmp / "missing", "--from .*missing does not exist: pass an ImageNet-layout folder or a CIFAR"),
    (lambda tmp: (tmp / "flat").mkdir() or tmp / "flat", "flat has no train/ folder: expected"),
    (lambda tmp: (tmp / "x.txt").write_text("hi") and tmp / "x.txt", "x.txt is neither a folder with train/ and val/"),
    (lambda tmp: make_image_folder(tmp / "odd", val_classes=("cat", "cow")), "different class folders .cow, dog."),
])
def test_bad_sources_fail_in_one_line(empty_data, tmp_path, capsys, setup, message):
    assert run_cli("bad", "--from", setup(tmp_path)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith("convit-ssl prepare-data: error:")
    assert __import__("re").search(message, error), error
    assert "bad" not in data.read_catalog()


def test_empty_class_and_missing_from(digits_data, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "p")
    (folder / "train" / "cat" / "a.png").unlink()
    assert run_cli("p", "--from", folder) == 2
    assert "class folder(s) without images: cat" in capsys.readouterr().err
    assert run_cli("cifar10") == 2
    assert "dataset 'cifar10' needs --from PATH" in capsys.readouterr().err
    assert run_cli("digits") == 0 and "digits and digits_val ready" in capsys.readouterr().out


def small_cifar10(tmp_path, name="cifar-10-python.tar.gz"):
    rng = np.random.default_rng(3)
    return write_archive(tmp_path / name, "cifar-10-batches-py", {
        "data_batch_1": batch(rng, 10, b"labels", 10), "test_batch": batch(rng, 10, b"labels", 10),
        "batches.meta": {b"label_names": CIFAR10_NAMES}})


def one_line_error(capsys):
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith("convit-ssl prepare-data: error:"), error
    return error


def test_out_folder_of_the_user_is_never_deleted(empty_data, tmp_path, capsys):
    archive = small_cifar10(tmp_path)
    mine = tmp_path / "thesis"
    (mine / "chapter1").mkdir(parents=True)
    (mine / "chapter1" / "draft.tex").write_text("months of work")
    assert run_cli("c10", "--from", archive, "--out", mine) == 2
    assert "was not created by convit-ssl" in one_line_error(capsys)
    assert (mine / "chapter1" / "draft.tex").read_text() == "months of work"
    assert sorted(p.name for p in mine.rglob("*")) == ["chapter1", "draft.tex"]
    assert "c10" not in data.read_catalog() and not [p for p in tmp_path.iterdir() if p.name.startswith(".thesis")]

    (tmp_path / "empty").mkdir()  # an empty folder is fine to fill
    assert run_cli("c10", "--from", archive, "--out", tmp_path / "empty") == 0
    assert len(ImageFolder(str(tmp_path / "empty" / "train"))) == 10


def test_a_foreign_folder_named_like_the_dataset_is_refused(empty_data, tmp_path, capsys):
    (empty_data / "c10").mkdir(parents=True)
    (empty_data / "c10" / "notes.txt").write_text("mine")
    assert run_cli("c10", "--from", small_cifar10(tmp_path)) == 2
    assert f"{empty_data / 'c10'} exists, holds files and was not created by convit-ssl" in one_line_error(capsys)
    assert (empty_data / "c10" / "notes.txt").read_text() == "mine"
    (empty_data / "digits").mkdir()
    (empty_data / "digits" / "photo.jpg").write_bytes(b"mine")
    with pytest.raises(ValueError, match="was not created by convit-ssl"):
        data.ensure_digits()
    assert [p.name for p in (empty_data / "digits").iterdir()] == ["photo.jpg"]


@pytest.mark.parametrize("name", ["..", ".", "../../x", "a/b", "../data", "", "a;b", "x y"])
def test_names_are_checked_before_anything_is_touched(empty_data, tmp_path, capsys, name):
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (tmp_path / "sibling.txt").write_text("keep")
    empty_data.mkdir()
    (empty_data / "dataset_catalog.json").write_text("{}")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["prepare-data", name, "--from", str(small_cifar10(tmp_path / "x", "c.tar.gz")), "--quiet"]) == 2
    assert "is not a plain name" in one_line_error(capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == sorted(before + [str(tmp_path / "x" / "c.tar.gz")])
    assert main(["prepare-data", name, "--quiet"]) == 2  # without --from: the same check first
    assert "is not a plain name" in one_line_error(capsys)


def test_an_incomplete_copy_of_ours_is_replaced_only_once_the_new_one_is_complete(empty_data, tmp_path):
    archive = small_cifar10(tmp_path)
    assert run_cli("c10", "--from", archive) == 0
    (empty_data / "c10" / DONE_FILE).unlink()  # as a crash before the completion marker leaves it
    (empty_data / "c10" / "train" / "0_airplane").rename(empty_data / "c10" / "half")
    assert run_cli("c10", "--from", archive) == 0
    assert not (empty_data / "c10" / "half").exists() and len(ImageFolder(str(empty_data / "c10" / "train"))) == 10
    assert sorted(p.name for p in empty_data.iterdir() if p.name.startswith(".c10")) == []


def test_a_prepared_copy_of_another_archive_is_not_reused(empty_data, tmp_path, capsys):
    assert run_cli("c10", "--from", small_cifar10(tmp_path)) == 0
    (tmp_path / "other").mkdir()
    other = small_cifar10(tmp_path / "other")
    assert run_cli("c10", "--from", other) == 2
    assert "already holds a copy of" in one_line_error(capsys)


class Payload:
    """Unpickling this runs a shell command (it creates ``self.witness``)."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.witness}",)


@pytest.mark.parametrize("member", ["batches.meta", "test_batch", "data_batch_1"])
def test_a_crafted_archive_runs_no_code(empty_data, tmp_path, capsys, member):
    rng = np.random.default_rng(4)
    witness = tmp_path / "pwned"
    members = {"data_batch_1": batch(rng, 10, b"labels", 10), "test_batch": batch(rng, 10, b"labels", 10),
               "batches.meta": {b"label_names": CIFAR10_NAMES}}
    members[member] = {**members[member], b"extra": Payload(witness)}
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    assert run_cli("evil", "--from", archive) == 2
    error = one_line_error(capsys)
    assert f"{archive} member cifar-10-batches-py/{member}" in error and "posix.system" in error, error
    assert not witness.exists() and "evil" not in data.read_catalog()
    assert not (empty_data / "evil").exists()


def test_batches_of_the_wrong_shape_fail_in_one_line(empty_data, tmp_path, capsys):
    rng = np.random.default_rng(5)
    bad = batch(rng, 10, b"labels", 10)
    bad[b"labels"] = bad[b"labels"][:-1] + [12]
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", {
        "data_batch_1": batch(rng, 10, b"labels", 10), "test_batch": bad,
        "batches.meta": {b"label_names": CIFAR10_NAMES}})
    assert run_cli("odd", "--from", archive) == 2
    assert "test_batch" in one_line_error(capsys)
