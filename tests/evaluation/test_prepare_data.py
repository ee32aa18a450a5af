"""prepare-data: CIFAR archives in the real pickle format, image folders in place, one-line errors."""
import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from convit_ssl import data
from convit_ssl.cli import main

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def batch(rng, count, label_key, num_classes):
    """A batch file as the real archives hold it: byte keys, (N, 3072) uint8 rows, R then G then B planes.

    Labels cycle through every class from a random start, so each class has an image once count >= num_classes.
    """
    labels = ((np.arange(count) + rng.integers(num_classes)) % num_classes).tolist()
    return {b"batch_label": b"test batch", b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
            label_key: labels, b"filenames": [f"img_{i}.png".encode() for i in range(count)]}


def write_archive(path, folder, members):
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            payload = pickle.dumps(content, protocol=2)
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
    assert not (empty_data / "cut").exists() and not [p for p in empty_data.iterdir() if p.name.startswith(".cut")]


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
    assert sorted(p.name for p in empty_data.iterdir()) == [".catalog.lock", "dataset_catalog.json"]  # no copy


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
