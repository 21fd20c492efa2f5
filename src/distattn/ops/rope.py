"""Rotary position embeddings: inverse frequencies per scaling type, and rotation.

cos/sin tables here are "half" tables `[B, S, rotary_dim // 2]`: one angle per
rotated pair. Rotate-half style (HF) pairs channel i with i + rotary_dim/2;
interleaved style (Llama 4, Meta) pairs channels 2i and 2i+1. Channels past
rotary_dim (partial rotary) pass through unchanged.
"""

from __future__ import annotations

import math

import torch

from ..config import RopeConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """`[dim // 2]` fp64 inverse frequencies theta ** (-2i / dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    assert old_len is not None  # RopeConfig requires it for llama3
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor, old_len = rope.factor, rope.original_max_position_embeddings
    assert old_len is not None  # RopeConfig requires it for yarn
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # the rotary dimension whose wavelength makes `rotations` turns over the pretraining length
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = _base_inv_freq(rope.theta, dim)
    interpolation = extrapolation / factor
    keep = 1 - ramp  # 1: high frequency, extrapolate; 0: low frequency, interpolate
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def inv_freq_for(rope: RopeConfig, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[rotary_dim // 2]` (fp64) and the cos/sin multiplier."""
    if rope.rope_type == "yarn":
        return _yarn(rope, rotary_dim)
    inv_freq = _base_inv_freq(rope.theta, rotary_dim)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    return inv_freq, 1.0


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half cos/sin tables for integer positions.

    Args:
        inv_freq: `[R/2]` inverse frequencies.
        positions: `[B, S]` integer positions.

    Returns:
        `cos, sin`, each `[B, S, R/2]` in `dtype`, scaled by `attention_factor`.
    """
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(positions.device, torch.float64)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def half_table(table: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """Accept a cos/sin table of width R/2 (ours) or R (HF's duplicated form).

    A full-width table is cat(t, t) for rotate-half style and repeat_interleave(t, 2)
    for interleaved style; either way one angle per pair is kept. Returns `[B, S, R/2]`.
    """
    width = table.shape[-1]
    if width == rotary_dim // 2:
        return table
    if width == rotary_dim:
        return table[..., 0::2] if interleaved else table[..., : rotary_dim // 2]
    raise ValueError(
        f"cos_cache/sin_cache: last dim is {width}, expected {rotary_dim // 2} (one angle per "
        f"rotated pair) or {rotary_dim} (duplicated, as HF rotary modules return); "
        "pass tables built for this layer's rotary_dim"
    )


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int, interleaved: bool
) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of every head.

    Args:
        x: `[B, S, H, D]`.
        cos, sin: `[B, S, R/2]` half tables (R = rotary_dim).

    Returns:
        `[B, S, H, D]` in x's dtype; math in fp32 (fp64 for fp64 inputs).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    c = cos.to(acc).unsqueeze(2)  # [B, S, 1, R/2]
    s = sin.to(acc).unsqueeze(2)
    rot, rest = x[..., :rotary_dim].to(acc), x[..., rotary_dim:]
    if interleaved:
        even, odd = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)
    else:
        first, second = rot.chunk(2, dim=-1)
        rotated = torch.cat((first * c - second * s, second * c + first * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)
