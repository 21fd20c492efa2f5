"""The forward output: a dataclass that also unpacks and indexes like the old tuple."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass(frozen=True)
class NeuronAttentionBaseOutput:
    """Attention output (NxDI-compatible).

    `a, kv, cos, sin = out` unpacks the first four fields; `out[i]` indexes all six (NxDI's).
    """

    hidden_states: torch.Tensor  # [B, S, hidden_size]
    present_key_value: tuple[torch.Tensor, torch.Tensor] | None  # (K, V), see NeuronAttentionBase.forward
    cos_cache: torch.Tensor | None = None  # RoPE cos table used, for the next layer
    sin_cache: torch.Tensor | None = None  # RoPE sin table used
    residual: torch.Tensor | None = None  # hidden_states + residual, when a residual was given
    attn_input_hidden_states: torch.Tensor | None = None  # NxDI's interleaved-attention optimisation only: always None here

    def __iter__(self) -> Iterator[Any]:
        return iter([self.hidden_states, self.present_key_value, self.cos_cache, self.sin_cache])

    def __getitem__(self, i: int) -> Any:
        return getattr(self, fields(self)[i].name)
