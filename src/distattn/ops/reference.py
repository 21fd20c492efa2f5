"""The specification of attention: plain math in fp32 (fp64 for fp64 inputs).

Every kernel is tested against `attention_reference`; it is slow and simple on
purpose. Sinks, when given, join the softmax as one extra logit per query head
(the concat form), independently of the sigmoid form in `ops.merge.apply_sinks`.
"""

from __future__ import annotations

import torch

from .masks import visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention with position-derived masks.

    Args:
        q: `[B, Hq, Sq, D]`.
        k: `[B, Hkv, Sk, D]`; query head h reads kv head h // (Hq // Hkv).
        v: `[B, Hkv, Sk, D]`.
        q_pos: `[B, Sq]` query positions.
        k_pos: `[B, Sk]` key positions; negative marks an invalid key.
        scale: multiplier on q.k.
        sliding_window: see `ops.masks.visible`.
        chunk_size: see `ops.masks.visible`.
        mask: optional bool `[B, 1, Sq, Sk]` further restriction (True = may attend).
        sinks: optional `[Hq]` sink logits, one per query head, not scaled.

    Returns:
        `out [B, Hq, Sq, D]` in q's dtype (zeros for a query that sees no key and has
        no sink) and `lse [B, Hq, Sq]`, the log-sum-exp of the scaled scores over the
        visible keys only (sink excluded; -inf when no key is visible), in the
        compute dtype.
    """
    batch, n_q, s_q, _ = q.shape
    n_kv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    allowed = visible(q_pos, k_pos, sliding_window=sliding_window, chunk_size=chunk_size)  # [B, Sq, Sk]
    allowed = allowed.unsqueeze(1)  # [B, 1, Sq, Sk]
    if mask is not None:
        allowed = allowed & mask
    qg = q.to(acc).view(batch, n_kv, n_q // n_kv, s_q, -1)  # [B, Hkv, G, Sq, D]
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.to(acc)) * scale  # [B, Hkv, G, Sq, Sk]
    scores = scores.reshape(batch, n_q, s_q, -1)  # [B, Hq, Sq, Sk]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Sq]
    if sinks is None:
        norm = lse
    else:
        sink = sinks.to(acc).view(1, n_q, 1).expand_as(lse)
        norm = torch.logaddexp(lse, sink)
    safe_norm = torch.where(torch.isinf(norm), torch.zeros_like(norm), norm)
    probs = torch.exp(scores - safe_norm.unsqueeze(-1))  # exp(-inf) = 0 on masked keys
    probs = probs.view(batch, n_kv, n_q // n_kv, s_q, -1)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v.to(acc)).reshape(batch, n_q, s_q, -1)
    return out.to(q.dtype), lse
