"""Combine partial attention results by their log-sum-exp, and apply sinks once.

A partial result is `(out, lse)`: `out` is the softmax-weighted sum of values over
a subset of keys and `lse` the natural-log sum of exp(scores) over that subset
(`-inf` when the subset is empty for that query, with `out` = 0 there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention over disjoint key sets into attention over their union.

    Args:
        parts: each `(out [B, H, Sq, D], lse [B, H, Sq])`.

    Returns:
        `(out [B, H, Sq, D], lse [B, H, Sq])`; rows empty in every part stay 0 / -inf.
    """
    if len(parts) == 1:
        return parts[0]
    outs, lses = zip(*parts)
    acc = torch.promote_types(outs[0].dtype, torch.float32)
    lse_stack = torch.stack([lse.to(acc) for lse in lses])  # [P, B, H, Sq]
    lse = torch.logsumexp(lse_stack, dim=0)  # -inf where every part is empty
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lse_stack - safe)  # exp(-inf) = 0 for empty parts
    # an empty part adds exactly zero, never 0 * value (a NaN or Inf there stays out)
    terms = [torch.where(w.unsqueeze(-1) > 0, w.unsqueeze(-1) * o.to(acc), 0.0) for w, o in zip(weights, outs)]
    out = terms[0]
    for term in terms[1:]:  # in order, as the parts came
        out = out + term
    return out.to(outs[0].dtype), lse


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Rescale a merged result as if one sink logit per head joined the softmax.

    softmax over [scores, s_h] drops the sink column, so every probability is
    multiplied by sum(exp(x)) / (sum(exp(x)) + exp(s_h)) = sigmoid(lse - s_h).

    Args:
        out: `[B, H, Sq, D]` attention output without sinks.
        lse: `[B, H, Sq]` log-sum-exp of the scores over all keys seen.
        sinks: `[H]` sink logits (not scaled).

    Returns:
        `[B, H, Sq, D]` in `out.dtype`.
    """
    acc = torch.promote_types(out.dtype, torch.float32)
    factor = torch.sigmoid(lse.to(acc) - sinks.to(acc).view(1, -1, 1))  # [B, H, Sq]
    return (out.to(acc) * factor.unsqueeze(-1)).to(out.dtype)
