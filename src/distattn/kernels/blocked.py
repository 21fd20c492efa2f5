"""The blocked backend: query blocks attend only to the keys their window or chunk can reach.

For each block of queries the visible key positions lie in [lowest reachable, highest
query position] (a window reaches W - 1 back, a chunk back to its start), so only
those keys go to the fused kernel: O(S * (W + block)) work and memory instead of
O(S^2) for a sliding-window or chunked prefill. Each block sees all of its keys at
once, so no merging is needed and the log-sum-exp is exact.
"""

from __future__ import annotations

import torch

from .base import AttentionSpec, Backend
from .sdpa import SdpaBackend

QUERY_BLOCK = 256  # queries per fused call: large enough to keep the kernel efficient


def key_selection(q_pos: torch.Tensor, k_pos: torch.Tensor, spec: AttentionSpec) -> torch.Tensor | slice:
    """Indices of the keys any of these queries may see (a slice when they are contiguous).

    Args:
        q_pos: `[B, Sq]` positions of one query block; k_pos: `[B, Sk]` (-1: invalid).
    """
    top = int(q_pos.max())
    low = int(q_pos.min())
    if spec.sliding_window is not None:
        bottom = low - spec.sliding_window + 1
    elif spec.chunk_size is not None:
        bottom = low // spec.chunk_size * spec.chunk_size
    else:
        bottom = 0
    reach = ((k_pos >= max(bottom, 0)) & (k_pos <= top)).any(dim=0)  # [Sk]: any row may need it
    index = reach.nonzero().squeeze(1)
    if index.numel() and int(index[-1] - index[0]) + 1 == index.numel():
        return slice(int(index[0]), int(index[-1]) + 1)  # contiguous: a view, no copy
    return index


class BlockedBackend(Backend):
    name = "blocked"

    def __init__(self) -> None:
        self._fused = SdpaBackend()

    def supports(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> str | None:
        return self._fused.supports(q, k, spec)

    def worthwhile(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> str | None:
        """For "auto": None when skipping key blocks pays (a window or chunk well inside the keys)."""
        reach = spec.sliding_window or spec.chunk_size
        if reach is None:
            return "no sliding window or chunk: few key blocks to skip"
        if k.shape[2] <= 2 * reach + QUERY_BLOCK:
            return f"{k.shape[2]} keys: too few to skip (window/chunk {reach})"
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
        outs, lses = [], []
        for start in range(0, q.shape[2], QUERY_BLOCK):
            rows = slice(start, start + QUERY_BLOCK)
            keys = key_selection(q_pos[:, rows], k_pos, spec)
            block_mask = None
            if mask is not None:
                block_mask = mask[:, :, rows] if mask.shape[2] > 1 else mask
                if block_mask.shape[-1] > 1:
                    block_mask = block_mask[..., keys]
            if isinstance(keys, slice):
                k_b, v_b, pos_b = k[:, :, keys], v[:, :, keys], k_pos[:, keys]
            else:
                k_b, v_b, pos_b = k.index_select(2, keys), v.index_select(2, keys), k_pos.index_select(1, keys)
            out, lse = self._fused.attend(q[:, :, rows], k_b, v_b, q_pos=q_pos[:, rows], k_pos=pos_b, spec=spec, mask=block_mask)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
