"""The parallel stages of NeuronAttentionBase.forward, and the KV cache hand-off between layouts.

- Context-parallel prefill: the prompt's rows are split across the CP group; each rank
  projects its rows with its attention-TP heads, RoPE at their true positions, sees
  the whole group's K/V (all-gather, or a ring pass with log-sum-exp merging), and
  the outputs are gathered back into prompt order. Sinks are applied once per query,
  after every partial result is merged.
- Data-parallel decode: the batch is split across DP replicas; each replica's caches
  hold only its sequences, and outputs are gathered back along the batch.
- Hand-off: every prefill leaves each rank with the K/V of its own full-TP unit of
  heads for every prompt row; decode heads are that unit (or, under DP, the units of
  the DP group, gathered), so the cache always holds exactly what decode reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import comm
from .sequence import CP_SPLITS, cp_row_indices, dp_local_rows

if TYPE_CHECKING:  # pragma: no cover
    from ..validation import ForwardInputs

Tables = tuple[torch.Tensor | None, torch.Tensor | None]


def check_cp_split(split: str) -> str:
    if split not in CP_SPLITS:
        raise ValueError(f"cp_split={split!r} is unknown; use one of {CP_SPLITS}")
    return split


def _first_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, 1] first new position of each row (int64 max for a row of padding)."""
    return torch.where(valid, positions, torch.iinfo(torch.long).max).min(dim=1, keepdim=True).values


def prior_keys(
    inputs: ForwardInputs, rows: torch.Tensor | None, positions: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prior K, V `[B, Hkv, L, D]` and key positions `[B, L]` (-1 unless before the row's new tokens)."""
    batch = positions.shape[0]
    if inputs.past_key_value is not None:
        k, v = inputs.past_key_value
        pos = torch.arange(k.shape[2], device=k.device).expand(batch, -1)  # static layout: slot j = position j
    else:
        k, v, pos = inputs.cache.read(rows, batch)  # type: ignore[union-attr]
    return k, v, pos.masked_fill(pos >= _first_positions(positions, valid), -1)


def _rows(t: torch.Tensor | None, index: torch.Tensor | slice, dim: int = 1) -> torch.Tensor | None:
    """Select rows of a `[B or 1, S, ...]` table along `dim` (batch-1 tables broadcast)."""
    if t is None:
        return None
    if dim == 0 and t.shape[0] == 1:
        return t
    return t[index] if dim == 0 else t[:, index]


def _full_tables(module: Any, x: torch.Tensor, inputs: ForwardInputs, cos: torch.Tensor | None, sin: torch.Tensor | None) -> Tables:
    """RoPE tables for every row (so the caller can slice them and return them whole)."""
    if module.config.rope is None or cos is not None:
        return cos, sin
    return module._rope_tables(x, inputs.rotary_position_ids)


def write_cache(
    module: Any, inputs: ForwardInputs, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, *, unit: bool
) -> None:
    """Store new K/V `[B, H, S, D]` for every batch row of the call.

    unit=True: the heads are this rank's full-TP unit (any prefill); under data
    parallelism they are gathered across the DP group into the decode layout and
    each replica keeps its own sequences. unit=False: already the decode layout.
    """
    cache, groups = inputs.cache, module.groups
    seq_ids = inputs.seq_ids if inputs.seq_ids is not None else torch.arange(k.shape[0], device=k.device)
    if unit and groups.dp_size > 1:
        k = torch.cat(comm.all_gather(k, groups.dp), dim=1)  # [B, Hkv_decode, S, D]
        v = torch.cat(comm.all_gather(v, groups.dp), dim=1)
        rows, mine = dp_local_rows(seq_ids, groups.dp_rank, cache.max_batch_size // groups.dp_size)
        if bool(mine.any()):
            cache.write(rows[mine], k[mine], v[mine], positions[mine], valid[mine])
        return
    cache.write(seq_ids, k, v, positions, valid)


def context_parallel_prefill(
    module: Any, x: torch.Tensor, inputs: ForwardInputs, cos: torch.Tensor | None, sin: torch.Tensor | None, *, write: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
    """Prefill with the prompt split across the CP group; returns ((hidden, cos, sin), this rank's new (K, V))."""
    groups = module.groups
    cp, me = groups.cp_size, groups.cp_rank
    batch, seq = inputs.position_ids.shape
    split = [cp_row_indices(seq, cp, r, module.cp_split).to(x.device) for r in range(cp)]
    order = torch.cat(split)  # prompt row of every gathered position (-1: padding)
    mine = split[me]
    take = mine.clamp(min=0)
    positions = inputs.position_ids[:, take]
    valid = inputs.valid[:, take] & (mine >= 0)
    cos, sin = _full_tables(module, x, inputs, cos, sin)
    owner, layout, sinks = module.stage_heads(True)
    q, k, v, _, _ = module.qkv(owner, layout, x[:, take], positions, inputs.rotary_position_ids[:, take], _rows(cos, take), _rows(sin, take))
    k_pos = positions.masked_fill(~valid, -1)
    queries = valid.view(batch, 1, -1, 1)  # padding queries see nothing
    if inputs.active_mask is not None:  # [B, 1, S, S] -> my queries x gathered keys
        restrict = inputs.active_mask[:, :, take][..., order.clamp(min=0)] & (order >= 0)
        queries = queries & restrict
    unit = layout.n_kv // cp  # kv heads of one full-TP unit; mine are block `me`
    own = slice(me * unit, (me + 1) * unit)
    if module.cp_ring:
        out, k_own, v_own, pos_all = _ring_attention(module, q, k, v, k_pos, positions, queries, sinks, own, order.numel() // cp)
    else:
        k_all = torch.cat(comm.all_gather(k, groups.cp), dim=2)  # [B, Hkv, cp * n_local, D] in `order`
        v_all = torch.cat(comm.all_gather(v, groups.cp), dim=2)
        pos_all = torch.cat(comm.all_gather(k_pos, groups.cp), dim=1)
        out = module.attend(q, [(k_all, v_all, pos_all, queries)], positions, sinks)
        k_own, v_own = k_all[:, own], v_all[:, own]
    local = module.output(owner, out)  # [B, n_local, hidden], reduced over the attention-TP group
    gathered = torch.cat(comm.all_gather(local, groups.cp), dim=1)  # [B, cp * n_local, hidden]
    hidden = gathered.new_zeros(batch, seq, gathered.shape[-1])
    real = order >= 0
    hidden[:, order[real]] = gathered[:, real]
    if write:
        write_cache(module, inputs, k_own, v_own, pos_all, pos_all >= 0, unit=True)
    return (hidden, cos, sin), (k, v)


def _ring_attention(
    module: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    q_pos: torch.Tensor,
    queries: torch.Tensor,
    sinks: torch.Tensor | None,
    own: slice,
    n_local: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass K/V blocks around the CP group, merging partial results by log-sum-exp.

    Returns the output (sinks applied once, after the last merge) and this rank's
    unit of K/V and key positions for every row, in gathered order, for the cache.
    """
    from ..ops.merge import apply_sinks, merge_partials

    groups = module.groups
    cp, me = groups.cp_size, groups.cp_rank
    block = (k, v, k_pos)
    merged = None
    own_k, own_v, own_pos = [None] * cp, [None] * cp, [None] * cp
    for step in range(cp):
        source = (me - step) % cp  # whose rows this block holds
        bk, bv, bpos = block
        mask = queries if queries.shape[-1] == 1 else queries[..., source * n_local : (source + 1) * n_local]
        part = module._kernel_call(q, bk, bv, q_pos, bpos, mask)
        merged = part if merged is None else merge_partials([merged, part])
        own_k[source], own_v[source], own_pos[source] = bk[:, own], bv[:, own], bpos
        if step < cp - 1:
            block = tuple(comm.ring_shift(t, groups.cp) for t in block)
    out, lse = merged  # type: ignore[misc]
    if sinks is not None:
        out = apply_sinks(out, lse, sinks)
    return out, torch.cat(own_k, dim=2), torch.cat(own_v, dim=2), torch.cat(own_pos, dim=1)


def data_parallel_decode(
    module: Any, x: torch.Tensor, inputs: ForwardInputs, cos: torch.Tensor | None, sin: torch.Tensor | None, *, write: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
    """Decode with the batch split across DP replicas; returns ((hidden, cos, sin), this replica's new (K, V))."""
    groups, cache = module.groups, inputs.cache
    batch = x.shape[0]
    per = batch // groups.dp_size
    rows = slice(groups.dp_rank * per, (groups.dp_rank + 1) * per)
    seq_ids = inputs.seq_ids if inputs.seq_ids is not None else torch.arange(batch, device=x.device)
    local_ids, _ = dp_local_rows(seq_ids[rows], groups.dp_rank, cache.max_batch_size // groups.dp_size)
    positions, valid = inputs.position_ids[rows], inputs.valid[rows]
    cos, sin = _full_tables(module, x, inputs, cos, sin)
    owner, layout, sinks = module.stage_heads(False)
    q, k, v, _, _ = module.qkv(owner, layout, x[rows], positions, inputs.rotary_position_ids[rows], _rows(cos, rows, 0), _rows(sin, rows, 0))
    queries = valid.view(per, 1, -1, 1)
    mask = queries if inputs.active_mask is None else queries & inputs.active_mask[rows]
    prior_k, prior_v, prior_pos = prior_keys(inputs, local_ids, positions, valid)
    blocks = [(k, v, positions.masked_fill(~valid, -1), mask), (prior_k, prior_v, prior_pos, queries)]
    local = module.output(owner, module.attend(q, blocks, positions, sinks))  # [B / dp, S, hidden]
    hidden = torch.cat(comm.all_gather(local, groups.dp), dim=0)  # replicas in batch order
    if write:
        cache.write(local_ids, k, v, positions, valid)
    return (hidden, cos, sin), (k, v)
