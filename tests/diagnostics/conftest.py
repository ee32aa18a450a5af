"""Fixtures of the gating-diagnostics tests: tiny ConViT trunks (tests/conftest.py sets one thread)."""
import pytest
import torch

from convit_ssl.models.convit import create_trunk

TINY = dict(img_size=32, patch_size=4, embed_dim=36, depth=3, num_heads=9, local_up_to_layer=2)


def tiny_trunk(seed: int = 0, **overrides):
    """A 3-block ConViT on 32 px images: 8 x 8 patches of 4 px, 9 heads, 2 GPSA blocks."""
    torch.manual_seed(seed)
    return create_trunk("convit_tiny", **{**TINY, **overrides})


@pytest.fixture
def make_trunk():
    """``make_trunk(seed=0, **overrides)``: a fresh tiny trunk."""
    return tiny_trunk


@pytest.fixture
def trunk():
    return tiny_trunk()


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
