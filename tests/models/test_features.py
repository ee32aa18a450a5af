"""out_feat_keys: VISSL's vision-transformer semantics where ConViT has a class token."""
import pytest
import torch

from convit_ssl.models import create_trunk
from oracles import TINY_ARGS


@pytest.fixture
def trunk():
    return create_trunk("convit_tiny", **{**TINY_ARGS, "depth": 4}).eval()


def test_default_is_last_cls_as_one_element_list(trunk):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        default = trunk(images)
        tokens = trunk.forward_features(images)
        (last_cls,) = trunk(images, ["lastCLS"])
    assert isinstance(default, list) and len(default) == 1
    assert torch.equal(default[0], tokens[:, 0]) and torch.equal(last_cls, tokens[:, 0])


def test_feature_keys_by_definition(trunk):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        blocks = trunk.forward_intermediates(images)
        normed = [trunk.norm(x) for x in blocks]
        features = trunk(images, ["lastPOOL", "concatCLS2", "concatPOOL3", "blkCLS3", "blkPOOL0", "blkPOOL2"])
    expected = [
        normed[3][:, 1:].mean(1),
        torch.cat([normed[2][:, 0], normed[3][:, 0]], -1),
        torch.cat([normed[1].mean(1), normed[2][:, 1:].mean(1), normed[3][:, 1:].mean(1)], -1),
        normed[3][:, 0],
        normed[0].mean(1),
        normed[2][:, 1:].mean(1),
    ]
    assert [f.shape[1] for f in features] == [36, 72, 108, 36, 36, 36]
    for got, want in zip(features, expected):
        assert torch.allclose(got, want, atol=1e-6)
    assert blocks[1].shape[1] == 16 and blocks[2].shape[1] == 17  # class token joins after the last GPSA block


def test_concat_cls_beyond_class_token_blocks_is_a_clear_error(trunk):
    with pytest.raises(ValueError, match=r"only the last 2 of 4 blocks carry a class token.*lastPOOL"):
        trunk(torch.randn(1, 3, 32, 32), ["concatCLS4"])
    with pytest.raises(ValueError, match="blkCLS<i> with i >= 2"):
        trunk(torch.randn(1, 3, 32, 32), ["blkCLS1"])


def test_unknown_key_lists_valid_ones(trunk):
    with pytest.raises(ValueError, match=r"unknown feature key 'res5'.*lastCLS.*concatPOOL<1..4>"):
        trunk(torch.randn(1, 3, 32, 32), ["res5"])
