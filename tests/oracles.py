"""Oracles and small builders shared by tests: timm reference models and a naive GPSA."""
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
