"""Fixtures of the evaluation tests: the digits dataset written once per session, tiny trunks, a quick recipe."""
import pytest
import torch
from PIL import Image

from convit_ssl.data import DATA_ENV
from convit_ssl.evaluation.linear_probe import load_recipe
from convit_ssl.models import create_trunk

torch.set_num_threads(1)  # also for session fixtures, which run before the per-test settings of tests/conftest.py

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, local_up_to_layer=2)


@pytest.fixture
def digits_data(data_root, monkeypatch):
    """CONVIT_SSL_DATA pointing at a data root that holds digits and digits_val."""
    monkeypatch.setenv(DATA_ENV, str(data_root))
    return data_root


@pytest.fixture
def empty_data(tmp_path, monkeypatch):
    """CONVIT_SSL_DATA pointing at an empty data root of this test."""
    root = tmp_path / "data"
    monkeypatch.setenv(DATA_ENV, str(root))
    return root


@pytest.fixture
def make_trunk():
    """Builds a tiny ConViT (48 wide, 3 blocks, 2 of them GPSA, patch 8 on 32 px) from a seed."""
    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return create_trunk("convit_tiny", **{**TINY, **overrides})
    return build


@pytest.fixture
def quick_recipe():
    """The digits recipe cut down to seconds: 2 x 2 x 2 heads, 20 epochs."""
    return load_recipe("digits").replace(epochs=20, lrs=[0.1, 1.0], wds=[0.0, 0.001],
                                         features=["lastCLS", "lastCLS+lastPOOL"])


@pytest.fixture
def make_image_dataset():
    """Writes train/ and val/ with ``per_class`` 32 px PNGs per class (class i's pixels all 40 * i); returns root."""
    def build(root, classes=("a", "b", "c"), per_class=3):
        for split in ("train", "val"):
            for index, name in enumerate(classes):
                (root / split / name).mkdir(parents=True)
                for image in range(per_class):
                    Image.new("RGB", (32, 32), (40 * index,) * 3).save(root / split / name / f"{image}.png")
        return root
    return build
