"""NxDI's RoPE helpers: `RotaryEmbedding` (same signature and outputs), `apply_rotary_pos_emb`, `rotate_half`, `repeat_kv`."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Default (unscaled) rotate-half RoPE tables, as NxDI's `RotaryEmbedding`.

    Args:
        dim: rotary width (head_dim).
        max_position_embeddings: kept for NxDI compatibility; positions are not bounded by it.
        base: RoPE base (HF `rope_theta`).

    `forward(x, position_ids)`: x is any tensor whose dtype and device the tables take
    (NxDI passes V `[B, H, S, D]`); position_ids `[B, S]` -> (cos, sin) `[B, S, dim]`,
    computed in fp32 (fp64 for fp64 x).
    """

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000, device: torch.device | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.inv_freq: torch.Tensor | None
        self.register_buffer("inv_freq", None, persistent=False)

    def get_inv_freqs(self, device: torch.device | None = None) -> torch.Tensor:
        """1 / base^(2i/dim), `[dim / 2]` fp32."""
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq is None or self.inv_freq.device != x.device:
            self.inv_freq = self.get_inv_freqs(x.device)
        acc = torch.promote_types(x.dtype, torch.float32)
        freqs = position_ids.to(acc)[:, :, None] * self.inv_freq.to(acc)[None, None, :]  # [B, S, dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, dim]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


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
