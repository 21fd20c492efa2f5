"""Which prompt rows a context-parallel rank takes, and which cache rows a DP replica holds.

Pure index math, the same on every rank.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

CPSplit = Literal["contiguous", "head_tail", "strided"]
CP_SPLITS = ("contiguous", "head_tail", "strided")


def check_cp_split(split: str) -> CPSplit:
    """`split` as a CPSplit; ValueError naming the choices otherwise."""
    if split not in CP_SPLITS:
        raise ValueError(f"cp_split={split!r} is unknown; use one of {CP_SPLITS}")
    return split  # type: ignore[return-value]  # checked against CP_SPLITS, the Literal's values


def cp_row_indices(seq_len: int, cp_size: int, cp_rank: int, split: CPSplit = "head_tail") -> torch.Tensor:
    """Prompt rows of one context-parallel rank, `[n_local]`, -1 marking padding rows.

    Every rank gets the same n_local (the prompt is padded up).
    - contiguous: rank c takes block c of cp blocks (causal work grows with c).
    - head_tail: 2*cp blocks; rank c takes blocks c and 2*cp-1-c, so every rank
      does about the same causal work.
    - strided: rank c takes rows c, c+cp, c+2cp, ... (also balanced).
    """
    if split not in CP_SPLITS:
        raise ValueError(f"cp_split={split!r} is unknown; use one of {CP_SPLITS}")
    if split == "strided":
        local = math.ceil(seq_len / cp_size)
        rows = torch.arange(local) * cp_size + cp_rank
    elif split == "contiguous":
        local = math.ceil(seq_len / cp_size)
        rows = torch.arange(local) + cp_rank * local
    else:
        block = math.ceil(seq_len / (2 * cp_size))
        rows = torch.cat([torch.arange(block) + cp_rank * block, torch.arange(block) + (2 * cp_size - 1 - cp_rank) * block])
    return torch.where(rows < seq_len, rows, -1)


def dp_rows_per_replica(max_batch_size: int, dp_size: int) -> int:
    """Sequences each data-parallel replica's cache holds."""
    if max_batch_size % dp_size:
        raise ValueError(f"max_batch_size={max_batch_size} must divide by the data-parallel degree {dp_size}")
    return max_batch_size // dp_size


def dp_local_rows(seq_ids: torch.Tensor, replica: int, rows_per_replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map global seq_ids to one replica's cache rows.

    Returns (local rows, mine): ids in this replica's range [replica * R, (replica + 1) * R)
    map to 0..R-1; any other id maps to the garbage row R, never into another sequence's row.
    """
    local = seq_ids - replica * rows_per_replica
    mine = (local >= 0) & (local < rows_per_replica)
    return torch.where(mine, local, rows_per_replica), mine
