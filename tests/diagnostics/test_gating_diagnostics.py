"""Gates, attention distances and attention maps of GPSA layers, checked against hand-computed values."""
import math

import pytest
import torch

from convit_ssl.diagnostics import (
    attention_maps,
    diagnostics_record,
    gating_diagnostics,
    gpsa_blocks,
    mean_attention_distance,
    patch_distances,
)


def _sharpen_content(trunk, factor=30.0):
    """Scale q/k weights so content attention is far from uniform (init weights give ~uniform rows)."""
    with torch.no_grad():
        for i in gpsa_blocks(trunk):
            trunk.blocks[i].attn.qk.weight.mul_(factor)


def test_fresh_trunk_gates_are_sigmoid_one(trunk, images):
    diagnostics = gating_diagnostics(trunk, images)
    assert diagnostics["blocks"] == [0, 1]
    assert diagnostics["gates"].shape == (2, 9)
    torch.testing.assert_close(diagnostics["gates"], torch.full((2, 9), 1 / (1 + math.exp(-1))))


def test_positional_attention_peaks_at_assigned_offset(trunk, images):
    query = (4, 3)
    maps = attention_maps(trunk, images[0], query=query)
    kernel, centre = 3, 1
    for h1 in range(kernel):
        for h2 in range(kernel):
            head = h1 + kernel * h2
            dx, dy = h2 - centre, h1 - centre
            for block in range(2):
                positional = maps["positional"][block, head]
                peak = divmod(positional.argmax().item(), 8)
                assert peak == (query[0] + dy, query[1] + dx), f"head {head}"


def test_positional_distance_shrinks_with_locality_strength(make_trunk, images):
    distances = [gating_diagnostics(make_trunk(locality_strength=alpha), images)["positional_distance"]
                 for alpha in (0.5, 1.0, 3.0)]
    assert (distances[0] > distances[1]).all() and (distances[1] > distances[2]).all()
    # Centre head at alpha = 3: almost all mass on the query patch itself.
    assert distances[2][0, 4] < 0.2


def test_mean_attention_distance_hand_computed():
    # 1 x 2 grid: the two patches are 1 apart.
    attention = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    assert mean_attention_distance(attention, (1, 2)).item() == pytest.approx((0.75 + 0.5) / 2)
    # 2 x 2 grid, uniform rows: each query sees distances 0, 1, 1, sqrt(2).
    uniform = torch.full((3, 4, 4), 0.25)  # leading dims are kept
    expected = (2 + math.sqrt(2)) / 4
    torch.testing.assert_close(mean_attention_distance(uniform, (2, 2)), torch.full((3,), expected))
    # 2 x 2 grid, each query attends fully to the diagonally opposite patch.
    opposite = torch.eye(4).flip(-1)
    assert mean_attention_distance(opposite, (2, 2)).item() == pytest.approx(math.sqrt(2))
    torch.testing.assert_close(patch_distances((1, 3)), torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]]))


def test_content_distance_uses_each_layers_real_input(trunk, images):
    _sharpen_content(trunk)
    diagnostics = gating_diagnostics(trunk, images)
    with torch.no_grad():
        tokens, grid = trunk.patch_embed(images)
        x = tokens + trunk.position_embedding(grid)
        for block in range(2):
            attn = trunk.blocks[block].attn
            content = attn.content_attention(trunk.blocks[block].norm1(x)).mean(dim=0)
            torch.testing.assert_close(diagnostics["content_distance"][block],
                                       mean_attention_distance(content, grid))
            positional = attn.positional_attention(grid)
            gate = attn.gate().view(-1, 1, 1)
            mixed = (1 - gate) * content + gate * positional
            torch.testing.assert_close(diagnostics["mixed_distance"][block], mean_attention_distance(mixed, grid))
            x = trunk.blocks[block](x, grid)
    # Layer 2's input is not the patch embedding: feeding that would give other numbers.
    with torch.no_grad():
        naive = trunk.blocks[1].attn.content_attention(trunk.blocks[1].norm1(tokens + trunk.position_embedding(grid)))
    assert not torch.allclose(mean_attention_distance(naive.mean(0), grid), diagnostics["content_distance"][1])


def test_mixed_follows_the_gate(trunk, images):
    _sharpen_content(trunk)
    with torch.no_grad():
        trunk.blocks[0].attn.gating.copy_(torch.linspace(-6, 6, 9))
    d = gating_diagnostics(trunk, images)
    # gate ~0: mixed = content; gate ~1: mixed = positional.
    assert d["mixed_distance"][0, 0].item() == pytest.approx(d["content_distance"][0, 0].item(), abs=0.02)
    assert d["mixed_distance"][0, 8].item() == pytest.approx(d["positional_distance"][0, 8].item(), abs=0.02)


def test_modes_are_restored_and_nothing_gets_gradients(trunk, images):
    trunk.train()
    trunk.blocks[0].mlp.eval()
    gating_diagnostics(trunk, images)
    attention_maps(trunk, images[0])
    assert trunk.training and trunk.blocks[1].attn.training and not trunk.blocks[0].mlp.training
    assert all(p.grad is None for p in trunk.parameters())


def test_attention_maps_shapes_and_rows_sum_to_one(trunk, images):
    maps = attention_maps(trunk, images[:1], blocks=[1], heads=[0, 4])
    assert maps["query"] == (4, 4) and maps["grid_size"] == (8, 8)
    for kind in ("positional", "content", "mixed"):
        assert maps[kind].shape == (1, 2, 8, 8)
        torch.testing.assert_close(maps[kind].sum(dim=(-2, -1)), torch.ones(1, 2))
    with pytest.raises(ValueError, match="not GPSA blocks"):
        attention_maps(trunk, images[0], blocks=[2])
    with pytest.raises(ValueError, match="outside"):
        attention_maps(trunk, images[0], query=(8, 0))


def test_record_is_json_ready_and_deit_has_no_layers(make_trunk, trunk, images):
    record = diagnostics_record(gating_diagnostics(trunk, images))
    assert record["grid_size"] == [8, 8]
    assert [layer["block"] for layer in record["layers"]] == [0, 1]
    assert len(record["layers"][0]["mixed_distance"]) == 9
    deit = gating_diagnostics(make_trunk(local_up_to_layer=0), images)
    assert deit["blocks"] == [] and deit["gates"].shape == (0, 9)


def test_full_precision_inside_an_autocast_region(trunk, images):
    # The hook runs inside the training step's autocast region: the numbers must not change.
    _sharpen_content(trunk)
    reference = gating_diagnostics(trunk, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = gating_diagnostics(trunk, images)
    for key in ("gates", "positional_distance", "content_distance", "mixed_distance"):
        assert inside[key].dtype == torch.float32
        torch.testing.assert_close(inside[key], reference[key])
