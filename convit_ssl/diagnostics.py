"""What the gates learn: per GPSA layer and head, the gate and the locality of each attention term.

Pure PyTorch (no VISSL import). For every GPSA block of a ``ConViT`` trunk:

* the gate g = sigmoid(gating), the head's weight on positional attention (0.731 at init);
* the mean attention distance sum_j A_ij ||r_ij|| (in patches, averaged over queries and over the
  probe images) of the positional attention P, the content attention C and the mixed attention
  (1 - g) C + g P that the block really applies.

Content attention depends on the image, so it is computed on each block's real input: the trunk
runs on the probe images and every GPSA block's attention receives ``blocks[i].norm1(x)`` of its
own input x, exactly as in training. Everything runs under ``no_grad`` with the trunk in eval mode
(no dropout, no drop-path); the train/eval flag of every submodule is restored afterwards.

Shapes: B probe images, L GPSA blocks (``trunk.local_up_to_layer``), H heads, N = GH * GW patches.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from convit_ssl.errors import UsageError
from convit_ssl.models.convit import ConViT, GatedPositionalSelfAttention, GridSize, relative_positions
from convit_ssl.models.modes import eval_mode

DISTANCE_KINDS = ("positional", "content", "mixed")
INITIAL_GATE = 1 / (1 + math.exp(-1))  # sigmoid(1): every GPSA gate at initialisation
CONVOLUTIONAL_GATE = 0.5  # a head above it puts more weight on positional than on content attention
DIAGNOSTIC_TENSORS = ("gates",) + tuple(f"{kind}_distance" for kind in DISTANCE_KINDS)  # the (L, H) results


def patch_distances(grid_size: GridSize, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Euclidean distance ||r_ij|| between patches i and j of a GH x GW grid, in patches, (N, N)."""
    return relative_positions(tuple(grid_size), torch.device(device or "cpu"), dtype)[..., 2].sqrt()


def mean_attention_distance(attention: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
    """Mean attention distance of attention matrices (..., N, N) whose rows sum to one: (...).

    For each query i, sum_j A_ij ||r_ij||; then the mean over the N queries.
    """
    distances = patch_distances(grid_size, attention.device, attention.dtype)
    return (attention * distances).sum(dim=-1).mean(dim=-1)


def _full_precision(trunk: ConViT):
    """Autocast off on the trunk's device (the hook runs inside the training step's autocast region)."""
    return torch.autocast(trunk.patch_embed.proj.weight.device.type, enabled=False)


def gpsa_blocks(trunk: ConViT) -> List[int]:
    """Indices of the blocks whose attention is GPSA (the first ``local_up_to_layer`` ones)."""
    return [i for i, block in enumerate(trunk.blocks) if isinstance(block.attn, GatedPositionalSelfAttention)]


def gpsa_inputs(trunk: ConViT, images: torch.Tensor) -> Tuple[List[torch.Tensor], GridSize]:
    """The normed inputs that each GPSA block's attention receives, [(B, N, C)] * L, and the grid.

    Runs the trunk up to its last GPSA block as it is (call under ``no_grad`` / ``eval_mode``) and
    records the argument of every GPSA ``attn`` module, i.e. ``blocks[i].norm1(x_i)``.
    """
    blocks = gpsa_blocks(trunk)
    if not blocks:
        return [], tuple(trunk.grid_size)
    captured: Dict[int, torch.Tensor] = {}
    grid: List[GridSize] = []

    def capture(index: int):
        def hook(module, args):
            captured[index] = args[0]
            grid[:] = [tuple(args[1])]
        return hook

    handles = [trunk.blocks[i].attn.register_forward_pre_hook(capture(i)) for i in blocks]
    try:
        weight = trunk.patch_embed.proj.weight
        trunk.forward_intermediates(images.to(weight.device, weight.dtype), up_to=blocks[-1])
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in blocks], grid[0]


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, height, width) or (3, height, width), got shape {tuple(images.shape)}")
    return images


def gating_diagnostics(trunk: ConViT, images: torch.Tensor) -> Dict[str, object]:
    """Gates and mean attention distances of every GPSA block and head, on a probe batch.

    Args:
        trunk: a ConViT trunk (any mode; it is restored).
        images: (B, 3, IH, IW) probe images (IH, IW multiples of the patch size), or one (3, IH, IW).

    Returns a dict:
        ``blocks``: list of the L GPSA block indices (0-based);
        ``grid_size``: (GH, GW) of the probe images;
        ``gates``: (L, H) sigmoid(gating);
        ``positional_distance``, ``content_distance``, ``mixed_distance``: (L, H) mean attention
        distances in patches, averaged over queries and probe images.

    The mixed distance is (1 - g) * content + g * positional distance: the distance is linear in
    the attention matrix, so this equals the distance of the mixed matrix itself.
    A trunk without GPSA blocks gives L = 0 (tensors of shape (0, H)).
    """
    images = _check_images(images)
    with torch.no_grad(), eval_mode(trunk), _full_precision(trunk):
        inputs, grid_size = gpsa_inputs(trunk, images)
        blocks = gpsa_blocks(trunk)
        gates, positional, content = [], [], []
        for index, normed in zip(blocks, inputs):
            attn = trunk.blocks[index].attn
            gates.append(attn.gate().float())
            positional.append(mean_attention_distance(attn.positional_attention(grid_size).float(), grid_size))
            mean_content = attn.content_attention(normed).float().mean(dim=0)  # (H, N, N), linear in A
            content.append(mean_attention_distance(mean_content, grid_size))
    empty = torch.zeros(0, trunk.num_heads)
    gates_t = torch.stack(gates).cpu() if gates else empty
    positional_t = torch.stack(positional).cpu() if positional else empty
    content_t = torch.stack(content).cpu() if content else empty
    return {
        "blocks": blocks,
        "grid_size": tuple(grid_size),
        "gates": gates_t,
        "positional_distance": positional_t,
        "content_distance": content_t,
        "mixed_distance": (1 - gates_t) * content_t + gates_t * positional_t,
    }


def diagnostics_record(diagnostics: Dict[str, object]) -> Dict[str, object]:
    """JSON-ready form of ``gating_diagnostics``: one entry per GPSA block with lists over heads.

    ``{"grid_size": [GH, GW], "layers": [{"block": i, "gates": [...H], "positional_distance": [...H],
    "content_distance": [...H], "mixed_distance": [...H]}, ...]}``
    """
    layers = []
    for row, block in enumerate(diagnostics["blocks"]):
        layer = {"block": block, "gates": diagnostics["gates"][row].tolist()}
        for kind in DISTANCE_KINDS:
            layer[f"{kind}_distance"] = diagnostics[f"{kind}_distance"][row].tolist()
        layers.append(layer)
    return {"grid_size": list(diagnostics["grid_size"]), "layers": layers}


def diagnostics_from_record(record: Mapping) -> Dict[str, object]:
    """The inverse of ``diagnostics_record``: a ``gating_diagnostics`` dict from one JSON record.

    ``blocks``, ``grid_size`` and the (L, H) tensors (float64) ``gates`` and ``<kind>_distance``.
    """
    layers = record["layers"]
    result: Dict[str, object] = {"blocks": [layer["block"] for layer in layers],
                                 "grid_size": tuple(record["grid_size"])}
    for key in DIAGNOSTIC_TENSORS:
        result[key] = torch.tensor([layer[key] for layer in layers], dtype=torch.float64)
    return result


def attention_maps(
    trunk: ConViT,
    image: torch.Tensor,
    blocks: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    query: Optional[Tuple[int, int]] = None,
) -> Dict[str, object]:
    """Where one query patch looks, per chosen GPSA block and head, for one image.

    Args:
        trunk: a ConViT trunk.
        image: (3, IH, IW) or (1, 3, IH, IW).
        blocks: GPSA block indices (default: all GPSA blocks).
        heads: head indices (default: all heads).
        query: (row, col) of the query patch (default: the centre patch (GH // 2, GW // 2)).

    Returns a dict with ``blocks``, ``heads``, ``query`` (row, col), ``grid_size`` (GH, GW),
    ``gates`` (L', H') and the attention rows of the query as maps ``positional``, ``content``,
    ``mixed``: each (L', H', GH, GW), summing to one over the grid.
    """
    image = _check_images(image)
    if image.shape[0] != 1:
        raise UsageError(f"attention_maps takes one image, got a batch of {image.shape[0]}: pass image[0]")
    available = gpsa_blocks(trunk)
    blocks = list(available if blocks is None else blocks)
    unknown = [b for b in blocks if b not in available]
    if unknown:
        raise UsageError(f"blocks {unknown} are not GPSA blocks; GPSA blocks of this trunk: {available}")
    heads = list(range(trunk.num_heads) if heads is None else heads)
    if any(not 0 <= h < trunk.num_heads for h in heads):
        raise UsageError(f"heads {heads} out of range: this trunk has heads 0..{trunk.num_heads - 1}")
    with torch.no_grad(), eval_mode(trunk), _full_precision(trunk):
        inputs, grid_size = gpsa_inputs(trunk, image)
        row, col = query if query is not None else (grid_size[0] // 2, grid_size[1] // 2)
        if not (0 <= row < grid_size[0] and 0 <= col < grid_size[1]):
            raise UsageError(f"query patch {(row, col)} is outside the {grid_size[0]}x{grid_size[1]} patch grid")
        q = row * grid_size[1] + col
        maps = {kind: [] for kind in DISTANCE_KINDS}
        gates = []
        for block in blocks:
            attn = trunk.blocks[block].attn
            gate = attn.gate().float()[heads].view(-1, 1)
            positional = attn.positional_attention(grid_size).float()[heads, q]
            content = attn.content_attention(inputs[available.index(block)]).float()[0, heads, q]
            maps["positional"].append(positional)
            maps["content"].append(content)
            maps["mixed"].append((1 - gate) * content + gate * positional)
            gates.append(gate.view(-1))
    result: Dict[str, object] = {
        "blocks": blocks, "heads": heads, "query": (row, col), "grid_size": tuple(grid_size),
        "gates": torch.stack(gates).cpu() if gates else torch.zeros(0, len(heads)),
    }
    for kind, rows in maps.items():
        stacked = torch.stack(rows) if rows else torch.zeros(0, len(heads), grid_size[0] * grid_size[1])
        result[kind] = stacked.reshape(len(blocks), len(heads), *grid_size).cpu()
    return result
