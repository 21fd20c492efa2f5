"""The reference backend: `distattn.ops.reference.attention_reference`, always available."""

from __future__ import annotations

import torch

from ..ops.reference import attention_reference
from .base import AttentionSpec, Backend


class ReferenceBackend(Backend):
    """The specification as a backend; the oracle for every other backend."""

    name = "reference"

    def supports(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> str | None:
        return None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        spec: AttentionSpec,
        mask: torch.Tensor | None = None,
        plain_causal: bool | None = None,
        sinks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_reference(
            q,
            k,
            v,
            q_pos=q_pos,
            k_pos=k_pos,
            scale=spec.scale,
            sliding_window=spec.sliding_window,
            chunk_size=spec.chunk_size,
            mask=mask,
        )
