"""apply_rope against independent formulations: complex multiplication and HF's rotate_half."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from distattn.ops.rope import apply_rope, half_table

from tolerances import FP64


def _case(rotary_dim: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=gen, dtype=torch.float64)  # [B, S, H, D]
    angles = torch.rand(2, 5, rotary_dim // 2, generator=gen, dtype=torch.float64) * 20  # [B, S, R/2]
    return x, angles


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_interleaved_is_complex_multiplication(rotary_dim: int) -> None:
    x, angles = _case(rotary_dim)
    pairs = torch.view_as_complex(x[..., :rotary_dim].reshape(2, 5, 3, rotary_dim // 2, 2).contiguous())
    rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    expected = torch.cat([rotated, x[..., rotary_dim:]], dim=-1)
    got = apply_rope(x, angles.cos(), angles.sin(), rotary_dim=rotary_dim, interleaved=True)
    assert (got - expected).abs().max().item() <= FP64


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotate_half_matches_hf(rotary_dim: int) -> None:
    x, angles = _case(rotary_dim)
    full = torch.cat([angles, angles], dim=-1)  # HF's duplicated tables [B, S, R]
    xt = x.transpose(1, 2)  # HF layout [B, H, S, D]
    rot, _ = apply_rotary_pos_emb(xt[..., :rotary_dim], xt[..., :rotary_dim], full.cos(), full.sin())
    expected = torch.cat([rot, xt[..., rotary_dim:]], dim=-1).transpose(1, 2)
    got = apply_rope(x, half_table(full.cos(), rotary_dim, False), half_table(full.sin(), rotary_dim, False), rotary_dim=rotary_dim, interleaved=False)
    assert (got - expected).abs().max().item() <= FP64
