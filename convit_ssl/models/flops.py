"""FLOP counting with fvcore (one multiply-add = one flop, the convention of the paper's tables)."""
from __future__ import annotations

import math
from typing import Any, List

import torch
import torch.nn as nn


def _sdpa_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """aten::scaled_dot_product_attention: q k^T and attn @ v, (B, H, N, D) each."""
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape = get_shape(inputs[0]), get_shape(inputs[1])
    batch_heads = math.prod(q_shape[:-2])
    return 2 * batch_heads * q_shape[-2] * k_shape[-2] * q_shape[-1]


def count_flops(model: nn.Module, img_size: int = 224, batch_size: int = 1) -> int:
    """Multiply-adds of one forward pass at ``img_size`` px, as fvcore counts them (fused attention included)."""
    from fvcore.nn import FlopCountAnalysis

    device = next(model.parameters()).device
    images = torch.zeros(batch_size, 3, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, images)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())
    finally:
        model.train(was_training)
