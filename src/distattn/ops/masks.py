"""Which keys a query may see, as predicates on positions (one definition each).

Every path (reference, kernels, KV cache reads) derives its mask from these rules,
so causal, sliding-window and chunked attention mean the same thing everywhere.
A negative key position marks an empty or invalid slot and is never visible.
"""

from __future__ import annotations

import torch


def visible(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Boolean visibility of keys to queries.

    Args:
        q_pos: `[..., Sq]` integer query positions (>= 0).
        k_pos: `[..., Sk]` integer key positions; negative marks an invalid key.
        sliding_window: W; a query at p sees keys with p - W < k <= p.
        chunk_size: C; a query at p sees keys k <= p with k // C == p // C.

    Returns:
        `[..., Sq, Sk]` bool, True where the query may attend to the key.
    """
    qp = q_pos.unsqueeze(-1)  # [..., Sq, 1]
    kp = k_pos.unsqueeze(-2)  # [..., 1, Sk]
    mask = (kp >= 0) & (kp <= qp)  # causal, valid keys only
    if sliding_window is not None:
        mask = mask & (kp > qp - sliding_window)
    if chunk_size is not None:
        mask = mask & (torch.div(kp, chunk_size, rounding_mode="floor") == torch.div(qp, chunk_size, rounding_mode="floor"))
    return mask


NO_TOKENS = torch.iinfo(torch.long).max  # the first position of a row that is all padding


def first_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[B]` first position of each row's real tokens (NO_TOKENS for a row of padding)."""
    return torch.where(valid, positions, NO_TOKENS).min(dim=1).values


def starts_fresh(starts: torch.Tensor) -> bool:
    """Every row starts at position 0 (or has no tokens): nothing before it to read."""
    return bool(((starts == 0) | (starts == NO_TOKENS)).all())
