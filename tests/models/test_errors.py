"""Bad configurations fail early with a message that names the fix."""
import pytest
import torch

from convit_ssl.models import create_trunk


def test_unknown_arch_lists_known():
    with pytest.raises(ValueError, match=r"unknown arch 'convit_huge'.*convit_tiny.*deit_base"):
        create_trunk("convit_huge")


def test_unknown_option_lists_valid():
    with pytest.raises(ValueError, match=r"unknown ConViT option\(s\) hidden_dim.*embed_dim"):
        create_trunk("convit_tiny", hidden_dim=10)


def test_img_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="not divisible by patch_size 16: use a multiple of 16"):
        create_trunk("convit_tiny", img_size=100)
    trunk = create_trunk("convit_tiny")
    with pytest.raises(ValueError, match="image size 100x112 is not divisible by the patch size 16"):
        trunk(torch.randn(1, 3, 100, 112))


def test_local_init_needs_square_heads():
    with pytest.raises(ValueError, match="square number of heads.*use 4, 9 or 16 heads"):
        create_trunk("convit_tiny", num_heads=6)
    assert create_trunk("convit_tiny", num_heads=6, use_local_init=False).num_heads == 6


@pytest.mark.parametrize("option, message", [
    (dict(depth=-2), "depth=-2: ConViT needs depth >= 1"),
    (dict(num_heads=0), "num_heads=0: ConViT needs num_heads >= 1"),  # was ZeroDivisionError
    (dict(embed_dim=0), "embed_dim=0: ConViT needs embed_dim >= 1"),
    (dict(img_size=(0, 32)), r"img_size=\(0, 32\): ConViT needs img_size >= 1"),
    (dict(mlp_ratio=0.0), "mlp_ratio=0.0: .* give mlp_ratio > 0"),
    (dict(drop_path_rate=-1.0), "drop_path_rate=-1.0: a dropout probability, give 0 <= drop_path_rate < 1"),
    (dict(attn_drop_rate=1.0), "attn_drop_rate=1.0: a dropout probability"),
])
def test_options_out_of_range_are_refused_by_the_trunk_and_without_building_one(option, message):
    from convit_ssl.models.convit import check_options, preset_kwargs

    with pytest.raises(ValueError, match=message):
        create_trunk("convit_tiny", **option)
    with pytest.raises(ValueError, match=message):
        check_options(**preset_kwargs("convit_tiny", **option))
    check_options(**preset_kwargs("convit_tiny"))


def test_more_gpsa_layers_than_depth():
    with pytest.raises(ValueError, match=r"local_up_to_layer=13 GPSA blocks with depth=12.*<= 11"):
        create_trunk("convit_tiny", local_up_to_layer=13)


def test_deit_twin_has_no_gpsa_and_class_token_from_start():
    twin = create_trunk("convit_small", local_up_to_layer=0)
    assert not any(block.use_gpsa for block in twin.blocks)
    assert twin.num_class_token_blocks == 12
    assert twin.forward_intermediates(torch.randn(1, 3, 224, 224), up_to=0)[0].shape == (1, 197, 432)
