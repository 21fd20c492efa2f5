"""Rows of different lengths and positions as one right-padded model call."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(rows: Sequence[tuple[int, Sequence[int]]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One call's inputs from rows of (first position, tokens); a row with no tokens is all padding.

    Returns input_ids, position_ids (row b: first_b, first_b + 1, ...) and attention_mask,
    each `[len(rows), width]` with width the longest row (at least 1).
    """
    width = max([1] + [len(tokens) for _, tokens in rows])
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for b, (_, tokens) in enumerate(rows):
        ids[b, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long, device=device)
        valid[b, : len(tokens)] = True
    positions = torch.tensor([first for first, _ in rows], device=device).unsqueeze(1) + torch.arange(width, device=device)
    return ids, positions, valid
