"""NxDI's RoPE helpers: `RotaryEmbedding` (same signature and outputs), `apply_rotary_pos_emb`, `rotate_half`, `repeat_kv`."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables, as NxDI's `RotaryEmbedding`: default, or linearly scaled by `factor`.

    Args:
        dim: rotary width (head_dim).
        max_position_embeddings: kept for NxDI compatibility; positions are not bounded by it.
        base: RoPE base (HF `rope_theta`).
        factor: linear scaling (inv_freq / factor, HF's "linear" rope type), None for none; an HF
            `rope_scaling` dict of type "linear" is read for its factor (Gemma 3 passes one).
        device: where the tables are first built (they follow x's device anyway).

    `forward(x, position_ids)`: x is any tensor whose dtype and device the tables take
    (NxDI passes V `[B, H, S, D]`); position_ids `[B, S]` -> (cos, sin) `[B, S, dim]`,
    computed in fp32 (fp64 for fp64 x).
    """

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000, factor: float | dict | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.factor = _linear_factor(factor)
        self.inv_freq: torch.Tensor | None
        self.register_buffer("inv_freq", None if device is None else self.get_inv_freqs(device), persistent=False)

    def get_inv_freqs(self, device: torch.device | None = None) -> torch.Tensor:
        """1 / base^(2i/dim) (over `factor` when scaled), `[dim / 2]` fp32."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))
        return inv_freq if self.factor is None else inv_freq / self.factor

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq is None or self.inv_freq.device != x.device:
            self.inv_freq = self.get_inv_freqs(x.device)
        acc = torch.promote_types(x.dtype, torch.float32)
        freqs = position_ids.to(acc)[:, :, None] * self.inv_freq.to(acc)[None, None, :]  # [B, S, dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, dim]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _linear_factor(factor: float | dict | None) -> float | None:
    """RotaryEmbedding's `factor` as a positive float or None; ValueError naming what is wrong."""
    if isinstance(factor, dict):  # an HF rope_scaling entry
        kind = factor.get("rope_type", factor.get("type"))
        if kind not in ("linear", "default", None):
            raise ValueError(f"factor={factor!r}: RotaryEmbedding scales linearly; for rope_type {kind!r} use the model's own rotary "
                             "module (distattn.ops.rope builds every HF rope type) or pass cos_cache / sin_cache")
        factor = factor.get("factor") if kind == "linear" else None
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0 or factor == float("inf"):
        raise ValueError(f"factor={factor!r} must be a positive number (linear RoPE scaling) or None")
    return float(factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k `[B, H, S, D]` by cos, sin `[B, S, D]` (rotate-half)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D], each kv head repeated for its q heads."""
    return hidden_states if n_rep == 1 else hidden_states.repeat_interleave(n_rep, dim=1)


def __getattr__(name: str) -> object:
    from distattn.nxdi import missing_name

    raise missing_name(__name__, name)
