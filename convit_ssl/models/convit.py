"""ConViT: vision transformers with gated positional self-attention (GPSA).

Paper: "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases",
d'Ascoli, Touvron, Leavitt, Morcos, Biroli, Sagun, ICML 2021 (arXiv 2103.10697).
Original code: github.com/facebookresearch/convit; reference port: timm `models/convit.py`.

The model here computes the same function as the reference (tested against timm to float tolerance)
and differs in how it computes it:

* The positional attention softmax(positional_proj(r_ij)) does not depend on the image, so it is
  computed once per forward for the whole batch instead of once per image.
* It is a Kronecker product and is never formed as an H x N x N matrix. Its logits
  w1 dx + w2 dy + w3 (dx^2 + dy^2) + b split into f(dx) + g(dy) + b, so on a full patch grid the
  softmax over all keys factorises exactly: P[(r, c), (r', c')] = Py[r, r'] * Px[c, c'] with
  Px = softmax over columns of w1 dx + w3 dx^2 + b (GW x GW per head; the bias cancels, it sits here
  so that it keeps a gradient, zero up to rounding as in the reference) and Py = softmax over rows
  of w2 dy + w3 dy^2 (GH x GH per head). P @ v is then a separable filter, Px along the columns and
  Py along the rows: N (GH + GW) D multiply-adds per head instead of N^2 D.
* When attention dropout is off, the gated mix is applied to the attention *outputs*:
  ``(1 - g) * softmax(q k^T / sqrt(d)) v + g * P v`` equals the reference's
  ``((1 - g) * softmax(q k^T / sqrt(d)) + g * P) v`` because both softmaxes sum to one (the
  reference's renormalisation is an identity up to rounding). The content term then runs through
  ``scaled_dot_product_attention`` (fused kernels, no B x H x N x N tensor kept for backward).
  The mix itself is written as ``(1 - g) * (content + odds * P v)`` with odds = g / (1 - g) =
  e^gating: the odds scale Py and (1 - g) scales the output projection's input columns, both small
  tensors, so mixing is one addition whose backward pass costs nothing. The odds stop growing at
  gating 30 (g = 1 - 1e-13). In half precision the mix is one lerp instead: float16 has no range for
  the odds, and bfloat16 too few bits for the gate's gradient, which the odds form gets as a difference.
  With attention dropout the reference's order is kept, on the dense P = kron(Py, Px).
* Positional attention values below the smallest normal float are set to zero, in Px and Py, in
  odds * Py (and in the dense P where it is formed). With local init the logits span hundreds of units,
  so a few percent of the softmax's entries are subnormal, and every matrix product that touches
  subnormals is many times slower on some CPUs. Each entry of the P applied differs from the
  reference's by float rounding (relative) plus less than ``torch.finfo(dtype).tiny`` (absolute): a
  flushed factor is below tiny and the other factor at most 1 (odds * Py enters weighted by 1 - g).
  The product of two normal factors can itself be subnormal; the separable filter keeps it (it never
  forms the product), the dense P flushes it.
* Relative positions come from the real grid (H x W, non-square allowed), not from sqrt(N), and
  the offset tables are built once per axis length, device and dtype.
* The position embedding is resampled (bicubic) to any grid, so one model takes several crop sizes.
* The patch tokens are laid out token-major once, after the patch embedding. The reference keeps the
  convolution's channel-major strides through the GPSA blocks (its class token, concatenated later, makes
  them contiguous), so each of their layer norms, residual additions and projections reads strided memory.

Shapes: B batch, N tokens, C width, H heads (``num_heads``), D = C / H per-head width, and the
patch grid is ``grid_size = (GH, GW)``.
"""
from __future__ import annotations

import inspect
import math
import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from convit_ssl.errors import UsageError

GridSize = Tuple[int, int]
# Above this gating (g = 1 - 1e-13) the mix's odds e^gating stop growing: float32's sigmoid is 1 from 17 on,
# and e^30 = 1e13 stays far from float32's largest value (half precision mixes without the odds).
_MAX_LOG_ODDS = 30.0


@lru_cache(maxsize=64)
def axis_offsets(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Offsets along one grid axis of ``length`` patches, (length, length, 2).

    Entry [i, j] is (d, d^2) with d = j - i, key minus query: columns give (dx, dx^2), rows
    (dy, dy^2), the reference's convention (x the column, y the row). Cached per length, device
    and dtype (a multi-crop step reuses the table of each crop size).
    """
    positions = torch.arange(length, device=device)
    offsets = positions[None, :] - positions[:, None]
    return torch.stack([offsets, offsets * offsets], dim=-1).to(dtype)


@lru_cache(maxsize=64)
def relative_positions(grid_size: GridSize, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Relative offsets between all patches of a GH x GW grid, (N, N, 3) with N = GH * GW.

    Entry [i, j] is (dx, dy, dx^2 + dy^2), key j minus query i, with x the column and y the row
    of a patch in row-major order: the reference's convention, for any grid shape. The model
    itself needs only ``axis_offsets``; this full table serves diagnostics (attention distances).
    """
    rows = torch.arange(grid_size[0], device=device).repeat_interleave(grid_size[1])
    cols = torch.arange(grid_size[1], device=device).repeat(grid_size[0])
    dx = cols[None, :] - cols[:, None]
    dy = rows[None, :] - rows[:, None]
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1).to(dtype)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision types (softmax and bicubic resampling need the range), else dtype."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def _flush_subnormals(probs: torch.Tensor) -> torch.Tensor:
    """Zero the entries of a probability tensor that are below the smallest normal float."""
    return probs.masked_fill(probs < torch.finfo(probs.dtype).tiny, 0.0)


def _dropout(rate: float) -> nn.Module:
    """Dropout, or nothing at rate 0 (nn.Dropout(0) still copies its input in training mode)."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``drop_prob``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob


class Mlp(nn.Module):
    """Two-layer perceptron of a transformer block: (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = _dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class GatedPositionalSelfAttention(nn.Module):
    """GPSA: per head, attention = (1 - g) * content + g * positional, g = sigmoid(gating).

    Content attention is softmax(q k^T / sqrt(D)); positional attention is
    softmax(positional_proj(r_ij)) over the relative offsets r_ij = (dx, dy, dx^2 + dy^2).
    Takes patch tokens only (no class token): (B, N, C) with N = GH * GW -> (B, N, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        locality_strength: float = 1.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.locality_strength = locality_strength
        self.attn_drop_rate = attn_drop
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.positional_proj = nn.Linear(3, num_heads)
        self.gating = nn.Parameter(torch.ones(num_heads))
        self.attn_drop = _dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = _dropout(proj_drop)

    def local_init(self) -> None:
        """Make each head's positional attention peak at one offset of a sqrt(H) x sqrt(H) kernel.

        Head (h1, h2) gets logits -alpha * |r - delta|^2 + const with delta = (h2 - c, h1 - c),
        c the kernel centre and alpha = ``locality_strength``; the value projection starts as the
        identity. Same layout as the official code, so official weights keep their meaning.
        """
        kernel_size = math.isqrt(self.num_heads)
        center = (kernel_size - 1) / 2
        weight = torch.zeros(self.num_heads, 3)
        for h1 in range(kernel_size):
            for h2 in range(kernel_size):
                head = h1 + kernel_size * h2
                weight[head] = torch.tensor([2 * (h2 - center), 2 * (h1 - center), -1.0])
        with torch.no_grad():
            self.positional_proj.weight.copy_(weight * self.locality_strength)
            self.positional_proj.bias.zero_()
            self.v.weight.copy_(torch.eye(self.v.weight.shape[0]))

    def positional_factors(
        self, grid_size: GridSize, dtype: Optional[torch.dtype] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two factors of the positional attention: rows Py (H, GH, GH) and columns Px (H, GW, GW).

        P[(r, c), (r', c')] = Py[r, r'] * Px[c, c'] (see the module docstring); each factor's rows
        sum to one. Computed in the parameters' precision (at least float32) also under autocast:
        the logits reach hundreds of units, where bfloat16 keeps no fraction. Only the results are
        cast to ``dtype``.
        """
        weight, bias = self.positional_proj.weight, self.positional_proj.bias  # columns: dx, dy, dx^2 + dy^2
        # torch.compile traces the tables' construction into the graph; eager mode uses the cache
        table = axis_offsets.__wrapped__ if torch.compiler.is_compiling() else axis_offsets
        with torch.autocast(weight.device.type, enabled=False):
            row_logits = F.linear(table(grid_size[0], weight.device, weight.dtype), weight[:, 1:])  # w2 dy + w3 dy^2
            col_logits = F.linear(table(grid_size[1], weight.device, weight.dtype), weight[:, 0::2], bias)
            rows, cols = (
                _flush_subnormals(logits.permute(2, 0, 1).softmax(dim=-1, dtype=_at_least_float32(logits.dtype)))
                for logits in (row_logits, col_logits)
            )
        return rows.to(dtype or weight.dtype), cols.to(dtype or weight.dtype)

    def positional_attention(self, grid_size: GridSize, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Positional attention of every head as a dense matrix, (H, N, N), rows summing to one.

        kron(Py, Px) per head, formed in full precision, subnormal products flushed, then cast to
        ``dtype``. The forward pass needs it only with attention dropout; diagnostics read it.
        """
        rows, cols = self.positional_factors(grid_size)
        H, (GH, GW) = self.num_heads, grid_size
        dense = (rows[:, :, None, :, None] * cols[:, None, :, None, :]).reshape(H, GH * GW, GH * GW)
        return _flush_subnormals(dense).to(dtype or self.positional_proj.weight.dtype)

    def gate(self) -> torch.Tensor:
        """sigmoid(gating): each head's weight on positional attention, (H,)."""
        return torch.sigmoid(self.gating)

    def content_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Content attention softmax(q k^T / sqrt(D)) of every head, (B, H, N, N)."""
        q, k = _split_heads(self.qk(x), self.num_heads, self.head_dim)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def forward(self, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        B, N, C = x.shape
        if self.training and self.attn_drop_rate > 0:
            # Dropout acts on the mixed, renormalised attention matrix: keep the reference's order.
            q, k = _split_heads(self.qk(x), self.num_heads, self.head_dim)
            (v,) = _split_heads(self.v(x), self.num_heads, self.head_dim)
            positional, gate = self.positional_attention(grid_size, dtype=v.dtype), self.gate().to(v.dtype)
            content = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            attn = torch.lerp(content, positional.expand(B, -1, -1, -1), gate.view(1, -1, 1, 1))
            out = (self.attn_drop(attn / attn.sum(dim=-1, keepdim=True)) @ v).transpose(1, 2)
        else:
            # One matrix product for q, k and v (the parameters stay qk and v, as in the reference).
            qkv = F.linear(x, torch.cat([self.qk.weight, self.v.weight]), _cat_bias(self.qk.bias, self.v.bias))
            q, k, v = _split_heads(qkv, self.num_heads, self.head_dim)
            rows, cols = self.positional_factors(grid_size)
            content_out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, N, H, D)
            if torch.finfo(v.dtype).bits < 32:
                # half precision: float16 cannot hold the gate's odds, and in bfloat16 the gate's gradient, a
                # difference of two terms in the odds form below, loses its bits: (1 - g) * content + g * positional
                positional_out = _separable_filter(rows.to(v.dtype), cols.to(v.dtype), v, grid_size)
                gate = self.gate().to(v.dtype).view(1, 1, -1, 1)
                out = torch.lerp(content_out, positional_out.permute(2, 1, 0, 3), gate)
            else:
                # (1 - g) * content + g * positional = (1 - g) * (content + odds * positional), odds = g / (1 - g)
                # = e^gating: odds scale the row factor and (1 - g) the projection's input columns, so the mix
                # is one addition, and its backward pass is free (the gate's gradient comes from the small factors)
                log_odds = self.gating.clamp(max=_MAX_LOG_ODDS)
                odds_rows = _flush_subnormals(rows * log_odds.exp().view(-1, 1, 1))
                positional_out = _separable_filter(odds_rows.to(v.dtype), cols.to(v.dtype), v, grid_size)
                out = (content_out + positional_out.permute(2, 1, 0, 3)).reshape(B, N, C)
                keep = torch.sigmoid(-log_odds).repeat_interleave(self.head_dim)  # 1 - g of each input column
                return self.proj_drop(F.linear(out, self.proj.weight * keep, self.proj.bias))
        return self.proj_drop(self.proj(out.reshape(B, N, C)))


def _separable_filter(rows: torch.Tensor, cols: torch.Tensor, v: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
    """P @ v for P = kron(rows, cols) per head, without forming P: (H, N, B, D).

    rows (H, GH, GH), cols (H, GW, GW), v (B, H, N, D) on a GH x GW grid in row-major order. Two
    batched matrix products over the heads: cols along the grid's columns, then rows along its rows.
    """
    B, H, N, D = v.shape
    GH, GW = grid_size
    by_column = v.reshape(B, H, GH, GW, D).permute(1, 3, 0, 2, 4).reshape(H, GW, B * GH * D)
    filtered = (cols @ by_column).reshape(H, GW, B, GH, D)
    by_row = filtered.permute(0, 3, 1, 2, 4).reshape(H, GH, GW * B * D)
    return (rows @ by_row).reshape(H, N, B, D)


def _split_heads(projections: torch.Tensor, num_heads: int, head_dim: int) -> Tuple[torch.Tensor, ...]:
    """(B, N, K * H * D) stacked projections (q, k, v, ...) -> K per-head views, each (B, H, N, D).

    Split along the channels rather than unbound from a permuted (K, B, H, N, D) view (timm's way): the
    backward pass then concatenates the K gradients straight into the (B, N, K * H * D) layout that the
    projection's backward reads, where unbind's stack also needs a permuting copy of all of them.
    """
    B, N, _ = projections.shape
    return tuple(
        part.view(B, N, num_heads, head_dim).transpose(1, 2)
        for part in projections.split(num_heads * head_dim, dim=-1)
    )


def _cat_bias(qk_bias: Optional[torch.Tensor], v_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if qk_bias is None else torch.cat([qk_bias, v_bias])


class MultiHeadSelfAttention(nn.Module):
    """Plain multi-head self-attention (fused kernel): (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop_rate = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = _dropout(proj_drop)

    def content_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention matrices softmax(q k^T / sqrt(D)), (B, H, N, N)."""
        q, k, _ = _split_heads(self.qkv(x), self.num_heads, self.head_dim)
        return ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5).softmax(dim=-1)

    def forward(self, x: torch.Tensor, grid_size: Optional[GridSize] = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = _split_heads(self.qkv(x), self.num_heads, self.head_dim)
        dropout = self.attn_drop_rate if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


def mlp_ratio_of(hidden_dim: int, dim: int) -> float:
    """The ``mlp_ratio`` that builds an MLP ``hidden_dim`` wide on width ``dim``: blocks take int(dim * mlp_ratio),
    as timm's do, and hidden_dim / dim can land a rounding below (432 * (1736 / 432) = 1735.99...)."""
    ratio = hidden_dim / dim
    while int(dim * ratio) < hidden_dim:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


class Block(nn.Module):
    """Pre-norm transformer block with GPSA or MHSA attention: (B, N, C) -> (B, N, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        use_gpsa: bool = True,
        locality_strength: float = 1.0,
    ):
        super().__init__()
        self.use_gpsa = use_gpsa
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if use_gpsa:
            self.attn = GatedPositionalSelfAttention(
                dim, num_heads, qkv_bias, attn_drop, proj_drop, locality_strength=locality_strength
            )
        else:
            self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid_size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Image to patch tokens: (B, 3, IH, IW) -> (B, GH * GW, C), GH = IH / patch_size."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, GridSize]:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise UsageError(
                f"image size {height}x{width} is not divisible by the patch size {self.patch_size}: "
                f"resize or crop to a multiple of {self.patch_size}"
            )
        x = self.proj(x)
        grid_size = (x.shape[-2], x.shape[-1])
        # token-major memory: the residual stream would otherwise keep the convolution's channel-major strides
        # through every GPSA block, and each layer norm, residual addition and projection pay for them
        return x.flatten(2).transpose(1, 2).contiguous(), grid_size


_FEATURE_KEY = re.compile(r"^(lastCLS|lastPOOL|concatCLS(\d+)|concatPOOL(\d+)|blkCLS(\d+)|blkPOOL(\d+))$")


class ConViT(nn.Module):
    """ConViT trunk: patch embedding, ``local_up_to_layer`` GPSA blocks, then MHSA blocks with a class token.

    Args:
        img_size: training image size (sets the stored position-embedding grid); any multiple of
            ``patch_size`` works at run time, non-square too.
        patch_size: side of a square patch, in pixels.
        in_chans: image channels.
        embed_dim: total width C (not per head, unlike timm's ``ConVit`` class).
        depth: number of blocks.
        num_heads: attention heads per block; a perfect square for local init.
        mlp_ratio: MLP hidden width over C.
        qkv_bias: bias on the query/key/value projections.
        drop_rate: dropout after the MLP and attention projections and after the position embedding.
        attn_drop_rate: dropout on attention matrices.
        drop_path_rate: stochastic depth of the last block (linear from 0 over the depth).
        local_up_to_layer: number of GPSA blocks; 0 gives the "DeiT twin" (all blocks MHSA).
        locality_strength: alpha, the sharpness of the local positional attention at init.
        use_local_init: initialise GPSA to convolution-like local attention.
        pos_embed_class_token: the position embedding has a slot for the class token, which then
            joins before the first block (DeiT/ViT layout; needs ``local_up_to_layer=0``).
        grad_checkpointing: recompute block activations in backward (saves memory, costs time).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        local_up_to_layer: int = 10,
        locality_strength: float = 1.0,
        use_local_init: bool = True,
        pos_embed_class_token: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        _validate(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, drop_rate, attn_drop_rate,
                  drop_path_rate, local_up_to_layer, use_local_init, pos_embed_class_token)
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.local_up_to_layer = local_up_to_layer
        self.patch_size = patch_size
        self.pos_embed_class_token = pos_embed_class_token
        self.grad_checkpointing = grad_checkpointing
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_positions = self.grid_size[0] * self.grid_size[1] + int(pos_embed_class_token)
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        self.class_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = _dropout(drop_rate)
        drop_path_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList([
            Block(
                embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rates[i],
                use_gpsa=i < local_up_to_layer, locality_strength=locality_strength,
            )
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights(use_local_init)

    def _init_weights(self, use_local_init: bool) -> None:
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if use_local_init:
            for module in self.modules():
                if isinstance(module, GatedPositionalSelfAttention):
                    module.local_init()

    @property
    def num_class_token_blocks(self) -> int:
        """How many blocks (the last ones) carry the class token."""
        return self.depth - self.local_up_to_layer

    def position_embedding(self, grid_size: GridSize) -> torch.Tensor:
        """Patch position embedding for a GH x GW grid, (1, GH * GW, C); bicubic resampling if needed."""
        pos = self.pos_embedding[:, int(self.pos_embed_class_token):]
        if tuple(grid_size) == self.grid_size:
            return pos
        pos = pos.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.to(_at_least_float32(pos.dtype)), size=tuple(grid_size), mode="bicubic", align_corners=False, antialias=True)
        return pos.to(self.pos_embedding.dtype).permute(0, 2, 3, 1).flatten(1, 2)

    def _add_class_token(self, x: torch.Tensor) -> torch.Tensor:
        token = self.class_token
        if self.pos_embed_class_token:
            token = token + self.pos_embedding[:, :1]
        return torch.cat([token.expand(x.shape[0], -1, -1), x], dim=1)

    def _run_block(self, index: int, x: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        block = self.blocks[index]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, grid_size, use_reentrant=False)
        return block(x, grid_size)

    def forward_intermediates(self, x: torch.Tensor, up_to: Optional[int] = None) -> List[torch.Tensor]:
        """Raw outputs of blocks 0 .. ``up_to`` (default: all), each (B, N_i, C).

        N_i = GH * GW for GPSA blocks and 1 + GH * GW (class token first) for the others.
        """
        x, grid_size = self.patch_embed(x)
        x = self.pos_drop(x + self.position_embedding(grid_size))
        last = self.depth - 1 if up_to is None else up_to
        outputs = []
        for i in range(last + 1):
            if i == self.local_up_to_layer:
                x = self._add_class_token(x)
            x = self._run_block(i, x, grid_size)
            outputs.append(x)
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final normed tokens, (B, 1 + GH * GW, C), class token first."""
        return self.norm(self.forward_intermediates(x)[-1])

    def feature_keys(self) -> List[str]:
        """Valid ``out_feat_keys`` patterns for this trunk."""
        return [
            "lastCLS", "lastPOOL", f"concatCLS<1..{self.num_class_token_blocks}>", f"concatPOOL<1..{self.depth}>",
            f"blkCLS<{self.local_up_to_layer}..{self.depth - 1}>", f"blkPOOL<0..{self.depth - 1}>",
        ]

    def parse_feature_key(self, key: str) -> Tuple[str, List[int]]:
        """Map a feature key to (kind, block indices): kind is 'CLS' or 'POOL'. UsageError for a key this trunk
        does not give."""
        match = _FEATURE_KEY.match(key)
        if match is None:
            raise UsageError(f"unknown feature key {key!r}; valid keys: {', '.join(self.feature_keys())}")
        kind = "CLS" if "CLS" in key else "POOL"
        if key.startswith("last"):
            blocks = [self.depth - 1]
        elif key.startswith("concat"):
            n = int(match.group(2) or match.group(3))
            limit = self.num_class_token_blocks if kind == "CLS" else self.depth
            if not 1 <= n <= limit:
                raise UsageError(self._cls_hint(key, limit) if kind == "CLS" else
                                 f"feature key {key!r}: n must be between 1 and the depth {self.depth}")
            blocks = list(range(self.depth - n, self.depth))
        else:
            index = int(match.group(4) or match.group(5))
            if not 0 <= index < self.depth:
                raise UsageError(f"feature key {key!r}: block index must be between 0 and {self.depth - 1}")
            if kind == "CLS" and index < self.local_up_to_layer:
                raise UsageError(self._cls_hint(key, self.num_class_token_blocks))
            blocks = [index]
        return kind, blocks

    def _cls_hint(self, key: str, limit: int) -> str:
        return (
            f"feature key {key!r}: only the last {limit} of {self.depth} blocks carry a class token "
            f"(the first {self.local_up_to_layer} are GPSA blocks without one), so use concatCLS<n> "
            f"with n <= {limit} or blkCLS<i> with i >= {self.local_up_to_layer}, or the patch-token "
            f"keys lastPOOL, concatPOOL<n>, blkPOOL<i>"
        )

    def forward(self, x: torch.Tensor, out_feat_keys: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
        """VISSL trunk interface: a list of (B, C_key) features, one per key.

        No keys: ``[lastCLS]``. ``lastCLS``/``lastPOOL``: final normed class token / mean of the final
        normed patch tokens. ``concatCLS<n>``/``concatPOOL<n>``: the same for the last n blocks,
        concatenated (each block's output goes through the final norm, as in DINO and VISSL).
        ``blkCLS<i>``/``blkPOOL<i>``: block i alone (0-based).
        """
        keys = list(out_feat_keys) if out_feat_keys else ["lastCLS"]
        parsed = [self.parse_feature_key(key) for key in keys]
        deepest = max(index for _, blocks in parsed for index in blocks)
        intermediates = self.forward_intermediates(x, up_to=deepest)
        normed: Dict[int, torch.Tensor] = {}
        outputs = []
        for kind, blocks in parsed:
            parts = []
            for index in blocks:
                if index not in normed:
                    normed[index] = self.norm(intermediates[index])
                tokens = normed[index]
                if kind == "CLS":
                    parts.append(tokens[:, 0])
                else:
                    has_class_token = index >= self.local_up_to_layer
                    parts.append(tokens[:, int(has_class_token):].mean(dim=1))
            outputs.append(torch.cat(parts, dim=-1))
        return outputs

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embedding", "class_token"}


def check_options(**options) -> None:
    """Raise ``UsageError`` for ConViT keyword arguments that make no trunk, without building one (the others take
    ConViT's defaults); the training config is checked with it before anything starts."""
    bound = inspect.signature(ConViT).bind(**options)
    bound.apply_defaults()
    size = bound.arguments["img_size"]
    bound.arguments["img_size"] = (size, size) if isinstance(size, int) else tuple(size)
    _validate(**{name: bound.arguments[name] for name in inspect.signature(_validate).parameters})


def _validate(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, drop_rate, attn_drop_rate,
              drop_path_rate, local_up_to_layer, use_local_init, pos_embed_class_token) -> None:
    counts = dict(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    for name, value in dict(counts, img_size=min(img_size)).items():
        if value < 1:
            raise UsageError(f"{name}={counts.get(name, img_size)}: ConViT needs {name} >= 1")
    if mlp_ratio <= 0:
        raise UsageError(f"mlp_ratio={mlp_ratio}: the MLP's hidden width is mlp_ratio x embed_dim, give mlp_ratio > 0")
    for name, rate in dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate).items():
        if not 0 <= rate < 1:
            raise UsageError(f"{name}={rate}: a dropout probability, give 0 <= {name} < 1")
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise UsageError(
            f"img_size {img_size[0]}x{img_size[1]} is not divisible by patch_size {patch_size}: "
            f"use a multiple of {patch_size} (e.g. {patch_size * max(1, img_size[0] // patch_size)})"
        )
    if embed_dim % num_heads:
        raise UsageError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: "
                         f"embed_dim is the total width, choose a multiple of num_heads")
    if not 0 <= local_up_to_layer < depth:
        raise UsageError(
            f"local_up_to_layer={local_up_to_layer} GPSA blocks with depth={depth}: ConViT needs at least one "
            f"plain block after the GPSA blocks to carry the class token; use 0 <= local_up_to_layer <= {depth - 1}"
        )
    if local_up_to_layer > 0 and use_local_init and math.isqrt(num_heads) ** 2 != num_heads:
        raise UsageError(
            f"local init needs a square number of heads (a sqrt(H) x sqrt(H) kernel), got num_heads={num_heads}: "
            f"use 4, 9 or 16 heads, or set use_local_init=False"
        )
    if pos_embed_class_token and local_up_to_layer > 0:
        raise UsageError("pos_embed_class_token=True is the DeiT/ViT layout and needs local_up_to_layer=0")


# Paper sizes (Table 1): 48 dims per head, 64 for the "+" sizes; 10 GPSA blocks of 12.
# DeiT sizes: timm's deit_*_patch16_224 (qkv bias, class token with a position embedding from block 0).
_CONVIT = dict(depth=12, local_up_to_layer=10, qkv_bias=False)
_DEIT = dict(depth=12, local_up_to_layer=0, qkv_bias=True, pos_embed_class_token=True)
PRESETS: Dict[str, dict] = {
    "convit_tiny": dict(_CONVIT, embed_dim=192, num_heads=4),
    "convit_tiny_plus": dict(_CONVIT, embed_dim=256, num_heads=4),
    "convit_small": dict(_CONVIT, embed_dim=432, num_heads=9),
    "convit_small_plus": dict(_CONVIT, embed_dim=576, num_heads=9),
    "convit_base": dict(_CONVIT, embed_dim=768, num_heads=16),
    "convit_base_plus": dict(_CONVIT, embed_dim=1024, num_heads=16),
    "deit_tiny": dict(_DEIT, embed_dim=192, num_heads=3),
    "deit_small": dict(_DEIT, embed_dim=384, num_heads=6),
    "deit_base": dict(_DEIT, embed_dim=768, num_heads=12),
}

_KEYWORDS = (
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "drop_rate",
    "attn_drop_rate", "drop_path_rate", "local_up_to_layer", "locality_strength", "use_local_init",
    "pos_embed_class_token", "grad_checkpointing",
)


def preset_kwargs(arch: str, **overrides) -> dict:
    """Keyword arguments of preset ``arch`` with ``overrides`` (timm's names) applied on top."""
    if arch not in PRESETS:
        raise UsageError(f"unknown arch {arch!r}; known presets: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(_KEYWORDS))
    if unknown:
        raise UsageError(f"unknown ConViT option(s) {', '.join(unknown)}; valid options: {', '.join(_KEYWORDS)}")
    return {**PRESETS[arch], **overrides}


def create_trunk(arch: str = "convit_tiny", **overrides) -> ConViT:
    """Build preset ``arch`` (see ``PRESETS``), any field overridden by keyword.

    The DeiT twin of a ConViT (same size, every block plain MHSA, class token from the start) is
    ``create_trunk("convit_small", local_up_to_layer=0)``.
    """
    return ConViT(**preset_kwargs(arch, **overrides))
