"""Per-head norms used as QK-norm, and the temperature scale of NoPE layers."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """RMS-normalise the last dim: x * rsqrt(mean(x^2) + eps) * (offset + weight).

    `weight=None` is the weightless form (HF Llama 4 "L2Norm"). Math in fp32
    (fp64 for fp64 inputs); returns x's dtype and shape.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight_offset + weight.to(acc))
    return y.to(x.dtype)


def temperature_scale(positions: torch.Tensor, floor_scale: float, attn_scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Llama 4 attention-temperature tuning of NoPE layers.

    Args:
        positions: `[B, S]` integer positions.
        dtype: of the computation (fp32 as HF; fp64 for fp64 layers).

    Returns:
        `[B, S]` multipliers log1p(floor((p + 1) / floor_scale)) * attn_scale + 1.
    """
    return torch.log1p(torch.floor((positions.to(dtype) + 1.0) / floor_scale)) * attn_scale + 1.0
