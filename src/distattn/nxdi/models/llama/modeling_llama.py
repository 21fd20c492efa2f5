"""What other NxDI model files import from `models.llama.modeling_llama`: `get_rmsnorm_cls`, `Llama3RotaryEmbedding`.

The Llama model itself (MLP, decoder layer, model) is out of scope: port its file, or
use `distattn.models.DecoderLM`.
"""

from __future__ import annotations

import torch
from torch import nn

from ....config import RopeConfig
from ....ops.rope import inv_freq_for
from ...modules.custom_calls import get_rmsnorm_cls

__all__ = ["Llama3RotaryEmbedding", "get_rmsnorm_cls"]


class Llama3RotaryEmbedding(nn.Module):
    """Llama 3.1 scaled rotate-half RoPE tables, with NxDI's constructor.

    `forward(x, position_ids)` -> (cos, sin) `[B, S, dim]` in x's dtype.
    """

    def __init__(
        self,
        dim: int,
        max_position_embeddings: int = 131072,
        base: float = 500000.0,
        factor: float = 8.0,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        original_max_position_embeddings: int = 8192,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.rope = RopeConfig(
            theta=base, rope_type="llama3", factor=factor, low_freq_factor=low_freq_factor,
            high_freq_factor=high_freq_factor, original_max_position_embeddings=original_max_position_embeddings,
        )

    def get_inv_freqs(self, device: torch.device | None = None) -> torch.Tensor:
        """The scaled inverse frequencies `[dim / 2]`."""
        return inv_freq_for(self.rope, self.dim)[0].to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = torch.promote_types(x.dtype, torch.float32)
        inv_freq = self.get_inv_freqs(x.device).to(acc)
        freqs = position_ids.to(acc)[:, :, None] * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def __getattr__(name: str) -> object:
    from distattn.nxdi import missing_name

    raise missing_name(__name__, name)
