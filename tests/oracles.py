"""Oracles and small builders shared by tests: timm reference models, a naive GPSA, training states compared,
probe results of two world sizes compared."""
import pytest
import timm
import torch

from convit_ssl.checkpoint import from_timm_state_dict

TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=36, depth=3, num_heads=9, local_up_to_layer=2)


def timm_and_ours(name: str, img_size: int = 224, **timm_kwargs):
    """A timm model (no classifier) and our trunk loaded from its weights, both in eval mode."""
    reference = timm.create_model(name, num_classes=0, img_size=img_size, **timm_kwargs).eval()
    trunk, _ = from_timm_state_dict(reference.state_dict())
    return reference, trunk.eval()


def naive_positional_attention(attn, grid_h: int, grid_w: int) -> torch.Tensor:
    """Positional attention from explicit patch coordinates, (H, N, N), float64: the definition, loop by loop
    (differentiable in the layer's positional weights)."""
    coords = [(r, c) for r in range(grid_h) for c in range(grid_w)]
    rel = torch.tensor(
        [[[kc - qc, kr - qr, (kc - qc) ** 2 + (kr - qr) ** 2] for (kr, kc) in coords] for (qr, qc) in coords],
        dtype=torch.float64,
    )
    weight = attn.positional_proj.weight.double()
    bias = attn.positional_proj.bias.double()
    return (rel @ weight.T + bias).permute(2, 0, 1).softmax(-1)


def assert_same(expected, got, path: str = "") -> None:
    """Two nested states are equal: the same keys, the same values, every tensor bit for bit."""
    assert type(expected) is type(got), path
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, got), (path, (expected.double() - got.double()).abs().max().item())
    elif isinstance(expected, dict):
        assert expected.keys() == got.keys(), path
        for key in expected:
            assert_same(expected[key], got[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), path
        for index, (want, have) in enumerate(zip(expected, got)):
            assert_same(want, have, f"{path}/{index}")
    else:
        assert expected == got, path


def assert_same_training_state(expected: dict, got: dict) -> None:
    """Two VISSL checkpoints hold the same trunk and heads, optimizer state (moments, step counts, schedules)
    and loss state (DINO's teacher and centre, MoCo's queue and key encoder), bit for bit."""
    for part in ("base_model", "optimizer"):
        assert_same(expected["classy_state_dict"][part], got["classy_state_dict"][part], part)
    assert_same(expected["loss"], got["loss"], "loss")


def assert_same_probe(several: dict, one: dict, world_size: int, test_images: int = 360) -> None:
    """Linear-probe results of ``world_size`` ranks and of one process: the same chosen head, every head's
    accuracies within one test image (digits: 360) and its last-epoch loss within 1e-4 relative (the ranks sum
    their gradients in another order, nothing else differs)."""
    one_image = 100 / test_images
    assert several["manifest"]["world_size"] == world_size and one["manifest"]["world_size"] == 1
    same = ("index", "feature", "lr", "wd")
    assert {key: several["chosen"][key] for key in same} == {key: one["chosen"][key] for key in same}
    assert several["dataset"] == one["dataset"] and len(several["grid"]) == len(one["grid"])
    for head_several, head_one in zip(several["grid"], one["grid"]):
        for key in ("heldout_top1", "test_top1", "test_top5"):
            assert abs(head_several[key] - head_one[key]) <= one_image + 1e-9, (key, head_several, head_one)
        assert head_several["final_train_loss"] == pytest.approx(head_one["final_train_loss"], rel=1e-4)
