"""What prepare-data records and evaluation checks: class folders and image counts per split, symbolic link
loops, images that PIL cannot read (named, also through DataLoader workers and VISSL's dataset)."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from convit_ssl import atomic, data
from convit_ssl.cli import main
from convit_ssl.evaluation.features import Preprocess, image_folder, split_features
from convit_ssl.images import UnreadableImage

PREPROCESS = Preprocess(32, 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def prepare(name, folder, capsys=None):
    code = main(["prepare-data", name, "--from", str(folder), "--quiet"])
    if capsys is not None:
        output = capsys.readouterr()
        return code, output.err
    return code


def one_line(error, command="prepare-data"):
    assert len(error.strip().splitlines()) == 1 and error.startswith(f"convit-ssl {command}: error:"), error
    return error


def test_prepare_data_records_classes_and_counts(empty_data, data_root, tmp_path, make_image_dataset):
    assert prepare("abc", make_image_dataset(tmp_path / "abc")) == 0
    record = data.read_manifest()["abc"]
    assert record["splits"]["val"] == {"classes": ["a", "b", "c"], "images": 9}
    assert record["splits"]["train"]["images"] == 9 and record["kind"] == "image folder"
    held_out = data.read_manifest(data_root)["digits_val"]  # the built-in datasets too
    assert held_out["splits"]["val"] == {"classes": [str(digit) for digit in range(10)], "images": 288}


def test_a_removed_class_folder_stops_evaluation(empty_data, tmp_path, make_trunk, capsys, make_image_dataset):
    folder = make_image_dataset(tmp_path / "abc")
    assert prepare("abc", folder) == 0
    import shutil

    shutil.rmtree(folder / "val" / "b")  # without the check: class c is scored as b
    with pytest.raises(ValueError, match=r"dataset 'abc': the val class folders changed since prepare-data "
                                         r"\(missing b\): labels would shift"):
        image_folder("abc", "val")
    with pytest.raises(ValueError, match="missing b"):
        split_features(make_trunk(), "abc", "val", ["lastCLS"], PREPROCESS)
    assert main(["knn", "--random", "convit_tiny", "--trunk-option", "patch_size=8", "--data", "abc", "--recipe",
                 "digits", "--out", str(tmp_path / "out"), "--no-cache", "--quiet"]) == 2
    assert "missing b" in one_line(capsys.readouterr().err, "knn")
    (folder / "val" / "b").mkdir()
    Image.new("RGB", (32, 32)).save(folder / "val" / "b" / "0.png")
    with pytest.raises(ValueError, match=r"the val split has 7 images, 9 when prepared: files were added or removed"):
        image_folder("abc", "val")


def test_a_val_split_with_training_images_is_refused(empty_data, tmp_path, capsys, make_image_dataset):
    """val/ (or one of its class folders) linked to train/'s: every evaluation would score training images."""
    import shutil

    folder = make_image_dataset(tmp_path / "abc")
    shutil.rmtree(folder / "val" / "b")
    os.symlink(folder / "train" / "b", folder / "val" / "b")
    code, error = prepare("abc", folder, capsys)
    assert code == 2 and re.search(r"train/ and val/ share 3 image\(s\) \(val/b/0.png, ", one_line(error)), error
    shutil.rmtree(folder / "val")
    os.symlink(folder / "train", folder / "val")
    code, error = prepare("abc", folder, capsys)
    assert code == 2 and "train/ and val/ share 9 image(s)" in one_line(error)
    assert "abc" not in data.read_catalog()


def test_symbolic_link_loops_are_not_followed(empty_data, tmp_path, capsys, make_image_dataset):
    folder = make_image_dataset(tmp_path / "abc")
    os.symlink("..", folder / "train" / "a" / "again")  # train/a/again -> train: a loop
    code, error = prepare("abc", folder, capsys)
    assert code == 2
    assert re.search(r"train/a/again leads back to a folder already read \(a symbolic link loop", one_line(error))
    (folder / "train" / "a" / "again").unlink()
    assert prepare("abc", folder) == 0
    os.symlink(folder / "val", folder / "val" / "c" / "loop")  # after prepare-data: evaluation refuses it
    with pytest.raises(ValueError, match="val/c/loop leads back to a folder already read"):
        image_folder("abc", "val")
    assert len(image_folder("abc", "train")) == 9


def test_registered_without_a_record_is_refused(empty_data, tmp_path, make_image_dataset):
    folder = make_image_dataset(tmp_path / "abc")
    data.register_dataset("abc", folder / "train", folder / "val")
    manifest = data.read_manifest()
    del manifest["abc"]
    atomic.write_json(manifest, data.manifest_path())  # as an older convit-ssl left it
    with pytest.raises(ValueError, match=r"dataset 'abc' has no record of its classes and images .*run convit-ssl "
                                         r"prepare-data abc --from PATH again"):
        data.dataset_split_dir("abc", "train")


def test_unreadable_images_are_found_by_prepare_data(empty_data, tmp_path, capsys, make_image_dataset):
    folder = make_image_dataset(tmp_path / "abc")
    (folder / "train" / "a" / "0.png").write_bytes(np.random.default_rng(0).bytes(500))  # random bytes
    (folder / "train" / "b" / "empty.jpg").write_bytes(b"")  # zero bytes
    (folder / "val" / "c" / "notes.jpg").write_text("not an image")  # text named .jpg
    code, error = prepare("abc", folder, capsys)
    assert code == 2
    one_line(error)
    assert "3 image(s) that PIL cannot read" in error
    assert "train/a/0.png, train/b/empty.jpg, val/c/notes.jpg" in error and "delete or replace them" in error
    assert "abc" not in data.read_catalog()


def test_evaluation_names_the_image_it_cannot_read(empty_data, tmp_path, make_trunk, capsys, make_image_dataset):
    folder = make_image_dataset(tmp_path / "abc")
    assert prepare("abc", folder) == 0
    broken = folder / "val" / "b" / "1.png"
    broken.write_bytes(b"GIF89a truncated")  # replaced after prepare-data
    with pytest.raises(UnreadableImage, match=f"cannot read image {broken}"):
        image_folder("abc", "val")[4]
    with pytest.raises(UnreadableImage) as caught:
        split_features(make_trunk(), "abc", "val", ["lastCLS"], PREPROCESS, batch_size=4, num_workers=0)
    assert str(caught.value).startswith(f"cannot read image {broken}") and "\n" not in str(caught.value)
    assert main(["knn", "--random", "convit_tiny", "--trunk-option", "patch_size=8", "--data", "abc", "--recipe",
                 "digits", "--out", str(tmp_path / "out"), "--no-cache", "--quiet"]) == 2
    assert f"cannot read image {broken}" in one_line(capsys.readouterr().err, "knn")


@pytest.mark.slow
def test_a_loader_workers_unreadable_image_comes_back_as_one_line(empty_data, tmp_path, make_trunk,
                                                                  make_image_dataset):
    folder = make_image_dataset(tmp_path / "abc")
    assert prepare("abc", folder) == 0
    broken = folder / "val" / "b" / "1.png"
    broken.write_bytes(b"GIF89a truncated")
    with pytest.raises(UnreadableImage) as caught:  # raised in a DataLoader worker process
        split_features(make_trunk(), "abc", "val", ["lastCLS"], PREPROCESS, batch_size=4, num_workers=1)
    assert str(caught.value).startswith(f"cannot read image {broken}") and "\n" not in str(caught.value)


def test_vissl_training_names_the_image_it_cannot_read(tmp_path, make_image_dataset):
    import convit_ssl.vissl_glue  # noqa: F401  (applies the VISSL patches)
    from vissl.data.disk_dataset import DiskImageDataset

    folder = make_image_dataset(tmp_path / "abc")
    broken = folder / "train" / "c" / "2.png"
    broken.write_bytes(b"")
    os.symlink(folder / "train" / "a", folder / "train" / "b" / "second")  # a second way into train/a
    config = {"DATA": {"TRAIN": {"BATCHSIZE_PER_REPLICA": 2, "REMOVE_IMG_PATH_PREFIX": "", "NEW_IMG_PATH_PREFIX": "",
                                 "ENABLE_QUEUE_DATASET": False}}}
    with pytest.raises(ValueError, match="train/b/second leads back to a folder already read"):
        DiskImageDataset(config, "disk_folder", str(folder / "train"), "TRAIN", "abc")
    (folder / "train" / "b" / "second").unlink()
    dataset = DiskImageDataset(config, "disk_folder", str(folder / "train"), "TRAIN", "abc")
    assert len(dataset) == 9 and np.asarray(dataset[3][0]).max() == 40  # class b
    with pytest.raises(ValueError, match=f"cannot read image {broken}"):
        dataset[8]


@pytest.mark.slow
def test_convit_ssl_train_names_the_image_it_cannot_read(empty_data, tmp_path, make_image_dataset):
    import subprocess
    import sys

    folder = make_image_dataset(tmp_path / "abc", per_class=4)
    assert main(["prepare-data", "abc", "--from", str(folder), "--like", "digits", "--quiet"]) == 0
    broken = folder / "train" / "b" / "3.png"
    broken.write_text("not an image")  # after prepare-data: only reading it finds out
    run = subprocess.run([sys.executable, "-m", "convit_ssl", "train", "config=digits_simclr", "data=abc",
                          "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.OPTIMIZER.num_epochs=1",
                          "trunk.depth=2", "trunk.local_up_to_layer=1", f"run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"convit-ssl train: error: cannot read image {broken} (UnidentifiedImageError"), last


def test_16_bit_images_are_read_scaled_to_8_bits(empty_data, tmp_path, make_image_dataset):
    """PIL's RGB conversion clips a 16-bit grey PNG (mode I;16) to white; 16-bit colour PNGs it scales by 1/256."""
    from convit_ssl.images import read_image

    folder = make_image_dataset(tmp_path / "abc")
    deep = folder / "train" / "a" / "deep.png"
    Image.fromarray(np.array([[0, 256, 32768, 65535]], dtype=np.uint16)).save(deep)
    assert Image.open(deep).mode == "I;16"
    assert read_image(deep).mode == "RGB" and np.asarray(read_image(deep))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert prepare("abc", folder) == 0


@pytest.mark.parametrize("name, pixels", [("wide.tif", np.int32), ("float.tif", np.float32)])
def test_images_of_unknown_range_are_refused(empty_data, tmp_path, capsys, make_image_dataset, name, pixels):
    """32-bit integer (mode I) and float (mode F) pixels have no known full scale: RGB conversion clips them."""
    from convit_ssl.images import read_image

    folder = make_image_dataset(tmp_path / "abc")
    image = folder / "val" / "b" / name
    Image.fromarray(np.array([[0, 1000, 60000]], dtype=pixels)).save(image)
    code, error = prepare("abc", folder, capsys)
    assert code == 2
    assert f"1 image(s) with 32-bit or float pixels: val/b/{name}" in one_line(error) and "8 bits" in error
    assert "abc" not in data.read_catalog()
    with pytest.raises(UnreadableImage, match=f"image {image} has 32-bit or float pixels .* save it with 8 bits"):
        read_image(image)


def test_prepare_data_says_which_files_it_left_out(empty_data, tmp_path, capsys, make_image_dataset):
    """Files without an image extension, or beside the class folders, are not images of the dataset: say so."""
    folder = make_image_dataset(tmp_path / "abc")
    Image.new("RGB", (32, 32)).save(folder / "train" / "a" / "LOUD.JPG")  # an image extension in any case is taken
    Image.new("RGB", (32, 32)).save(folder / "train" / "a" / "moving.gif")
    (folder / "val" / "c" / "notes.txt").write_text("labels by hand")
    Image.new("RGB", (32, 32)).save(folder / "train" / "stray.png")  # in no class folder
    assert prepare("abc", folder) == 0
    output = capsys.readouterr()
    assert f"train {folder / 'train'} (10 images)" in output.out and len(output.err.splitlines()) == 1
    assert output.err.startswith("convit-ssl prepare-data: warning: left out 3 file(s) without an image extension "
                                 "or outside a class folder: train/stray.png, train/a/moving.gif, val/c/notes.txt;")
    assert prepare("abc", make_image_dataset(tmp_path / "clean")) == 0 and capsys.readouterr().err == ""
