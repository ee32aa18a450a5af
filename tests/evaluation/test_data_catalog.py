"""The data root, the catalog VISSL reads, and the built-in digits datasets."""
import json
import threading

import numpy as np
import pytest
from PIL import Image

from convit_ssl import data
from convit_ssl.datasets.folders import DONE_FILE


def count_images(folder):
    return {entry.name: len(list(entry.glob("*.png"))) for entry in sorted(folder.iterdir())}


def test_data_root_follows_the_environment(empty_data, monkeypatch):
    assert data.data_root() == empty_data
    monkeypatch.delenv(data.DATA_ENV)
    assert data.data_root().parts[-3:] == (".cache", "convit_ssl", "data")


def test_digits_layout_split_and_pixels(digits_data):
    catalog = data.read_catalog()
    root = digits_data / "digits"
    assert catalog["digits"] == {"train": [str(root / "train")] * 2, "val": [str(root / "test")] * 2}
    assert catalog["digits_val"] == {"train": [str(root / "val_train")] * 2, "val": [str(root / "val_heldout")] * 2}
    train, test = count_images(root / "train"), count_images(root / "test")
    assert sum(train.values()) == 1437 and sum(test.values()) == 360 and list(train) == [str(d) for d in range(10)]
    assert all(abs(test[c] / (train[c] + test[c]) - 0.2) < 0.01 for c in train)  # stratified 80/20
    held_train, held_out = count_images(root / "val_train"), count_images(root / "val_heldout")
    assert sum(held_train.values()) == 1149 and sum(held_out.values()) == 288
    names = lambda folder: {p.name for p in folder.rglob("*.png")}  # noqa: E731
    assert names(root / "val_train") | names(root / "val_heldout") == names(root / "train")
    assert not names(root / "val_heldout") & names(root / "val_train")
    assert not names(root / "train") & names(root / "test")

    from sklearn.datasets import load_digits

    scans = load_digits()
    image = Image.open(root / "test" / "3" / next(p.name for p in sorted((root / "test" / "3").iterdir())))
    index = int(image.filename.rsplit("/", 1)[1][:4])
    assert scans.target[index] == 3 and image.size == (32, 32) and image.mode == "RGB"
    pixels = np.asarray(image)
    expected = np.round(scans.images[index] / 16 * 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)


def test_ensure_digits_is_idempotent_and_safe_concurrently(empty_data, monkeypatch):
    import sklearn.datasets

    full = sklearn.datasets.load_digits()
    first_200 = lambda: type(full)(images=full.images[:200], target=full.target[:200])  # noqa: E731  (quicker)
    monkeypatch.setattr(sklearn.datasets, "load_digits", first_200)
    threads = [threading.Thread(target=data.ensure_digits) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    root = empty_data / "digits"
    assert sum(count_images(root / "train").values()) == 160 and sum(count_images(root / "test").values()) == 40
    assert [p.name for p in empty_data.iterdir() if p.name.startswith(".digits")] == []  # no leftover temp folder
    stamp = (root / DONE_FILE).stat().st_mtime_ns
    data.ensure_digits()
    assert (root / DONE_FILE).stat().st_mtime_ns == stamp
    assert set(data.read_catalog()) == {"digits", "digits_val"}


def test_split_dir_errors_name_the_fix(data_root, empty_data, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "gone" / split / "cat").mkdir(parents=True)
    data.register_dataset("mine", tmp_path / "gone" / "train", tmp_path / "gone" / "val")
    (tmp_path / "gone" / "train" / "cat").rmdir()
    (tmp_path / "gone" / "train").rmdir()
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*known: digits, digits_val, mine; add it with: "
                                         r"convit-ssl prepare-data imagenet --from PATH"):
        data.dataset_split_dir("imagenet", "train")
    with pytest.raises(ValueError, match=f"the train folder {tmp_path / 'gone' / 'train'} does not exist"):
        data.dataset_split_dir("mine", "train")
    with pytest.raises(ValueError, match="unknown split 'test': use one of train, val"):
        data.dataset_split_dir("mine", "test")
    with pytest.raises(ValueError, match="is not a plain name"):
        data.register_dataset("a/b", tmp_path, tmp_path)
    assert json.loads(data.catalog_path().read_text())["mine"]["val"] == [str(tmp_path / "gone" / "val")] * 2
    assert data.dataset_split_dir("digits", "val", root=data_root) == data_root / "digits" / "test"
