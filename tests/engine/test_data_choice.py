"""data=NAME for a registered dataset: crops, statistics and patch size come from the data config recorded for it
at registration (digits_val: digits; a CIFAR copy: its variant's; an image folder: what --like said), or it is
refused in one line, never silently ImageNet's."""
import pickle

import numpy as np
import pytest
from PIL import Image

from convit_ssl import data, engine
from convit_ssl.cli import main
from convit_ssl.errors import UsageError
from convit_ssl.shipped_configs import DATA_CONFIG_DIR


@pytest.fixture
def empty_data(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "data"))
    return tmp_path / "data"


def compose(tmp_path, *words):
    return engine.compose(["config=dino", "model=convit_tiny", *words], run_dir=str(tmp_path / "run"))


def crops(config):
    settings = config.CONVIT_SSL
    return (settings.DATASET, settings.GLOBAL_CROP, settings.LOCAL_CROP, list(settings.MEAN),
            dict(config.MODEL.TRUNK.CONVIT_SSL.OVERRIDES), list(config.DATA.TRAIN.DATASET_NAMES))


def cifar100_folder(folder):
    """An extracted CIFAR-100 python folder: 100 training and 100 test images, one per class."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        batch = {b"data": rng.integers(0, 256, (100, 3072), dtype=np.uint8), b"fine_labels": list(range(100))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}, protocol=2))
    return folder


def image_folder(root):
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "cat" / "a.png")
    return root


def shipped(data_config):
    """(global crop, local crop, mean) of a shipped data file, read from the file."""
    from omegaconf import OmegaConf

    settings = OmegaConf.load(DATA_CONFIG_DIR / f"{data_config}.yaml").config
    return settings.CONVIT_SSL.GLOBAL_CROP, settings.CONVIT_SSL.LOCAL_CROP, list(settings.CONVIT_SSL.MEAN)


def test_digits_val_takes_the_digits_settings(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(data_root))
    held_out, digits = crops(compose(tmp_path, "data=digits_val")), crops(compose(tmp_path, "data=digits"))
    assert held_out[0] == "digits_val" and held_out[5] == ["digits_val"] and held_out[1:5] == digits[1:5]
    assert held_out[1:4] == shipped("digits") and held_out[1:3] == (32, 16)  # was ImageNet's 224 / 96
    assert held_out[4]["img_size"] == 32 and held_out[4]["patch_size"] == 4  # was the preset's 224 / 16


def test_a_cifar_copy_takes_its_variants_settings_and_a_folder_what_like_said(tmp_path, empty_data, capsys):
    assert main(["prepare-data", "small100", "--from", str(cifar100_folder(tmp_path / "c100")), "--quiet"]) == 0
    assert data.read_manifest()["small100"]["data_file"] == "cifar100"
    fits = "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=50"  # 100 images: CIFAR's batch of 128 would make no batch
    assert crops(compose(tmp_path, "data=small100", fits))[:4] == ("small100", *shipped("cifar100"))

    pets = image_folder(tmp_path / "pets")
    assert main(["prepare-data", "pets", "--from", str(pets), "--quiet"]) == 0
    with pytest.raises(UsageError, match=r"dataset 'pets' has no data config recorded .*convit-ssl prepare-data pets "
                                         r"--from PATH --like DATA .*imagenet1k"):
        compose(tmp_path, "data=pets")
    assert main(["prepare-data", "pets", "--from", str(pets), "--like", "imagenet1k", "--quiet"]) == 0
    one_image = "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=1"  # a batch the one-image folder can make
    assert crops(compose(tmp_path, "data=pets", one_image))[:4] == ("pets", *shipped("imagenet1k"))
    with pytest.raises(UsageError, match=r"unknown dataset 'nope'"):
        compose(tmp_path, "data=nope")


@pytest.mark.parametrize("words, message", [
    (["cifar10", "--from", "C100"], r"'cifar10' names the data config cifar10, which does not fit this cifar-100 "
                                    r"copy: register it as cifar100 or under another name"),
    (["imagenet1k", "--from", "PETS", "--like", "digits"], r"'imagenet1k' names the data config imagenet1k"),
    (["pets", "--from", "PETS", "--like", "imagenet"], r"--like 'imagenet' is not a data config; choose from "
                                                       r"cifar10, cifar100, digits, imagenet1k"),
    (["c", "--from", "C100", "--like", "imagenet1k"], r"--like is for image folders: a CIFAR copy is read with its "
                                                      r"variant's data config, cifar100"),
])
def test_names_and_like_that_contradict_the_data_are_refused(tmp_path, empty_data, capsys, words, message):
    sources = {"C100": str(cifar100_folder(tmp_path / "c100")), "PETS": str(image_folder(tmp_path / "pets"))}
    assert main(["prepare-data", *[sources.get(word, word) for word in words], "--quiet"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and __import__("re").search(message, error), error
    assert not data.read_catalog() and not (empty_data / words[0]).exists()
