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

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from . import comm
from .sequence import CP_SPLITS, cp_row_indices, dp_local_rows

from ..ops.masks import first_positions, starts_fresh

if TYPE_CHECKING:  # pragma: no cover
    from ..validation import ForwardInputs

Tables = tuple[torch.Tensor | None, torch.Tensor | None]


def check_cp_split(split: str) -> str:
    if split not in CP_SPLITS:
        raise ValueError(f"cp_split={split!r} is unknown; use one of {CP_SPLITS}")
    return split


def agree_on_stage(inputs: ForwardInputs, groups: Any) -> ForwardInputs:
    """The stage of a sequence-parallel call, decided over the CP group.

    Each rank sees only its rows, whose first position need not be 0 in a prefill;
    a row starts where its earliest row on any rank starts.
    """
    if not inputs.reads_prior:
        return inputs
    starts = comm.all_reduce_min(first_positions(inputs.position_ids, inputs.valid), groups.cp)
    return dataclasses.replace(inputs, context_encoding=starts_fresh(starts))


def prior_keys(
    inputs: ForwardInputs, rows: torch.Tensor | None, positions: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prior K, V `[B, Hkv, L, D]` and key positions `[B, L]` (-1 unless before the row's new tokens)."""
    batch = positions.shape[0]
    if inputs.past_key_value is not None:
        k, v = inputs.past_key_value
        pos = torch.arange(k.shape[2], device=k.device).expand(batch, -1)  # static layout: slot j = position j
    else:
        known = inputs.read_rows if rows is inputs.seq_ids else None  # found once per call
        k, v, pos = inputs.cache.read(rows, batch, known)  # type: ignore[union-attr]
    return k, v, pos.masked_fill(pos >= first_positions(positions, valid).unsqueeze(1), -1)


def _rows(t: torch.Tensor | None, index: torch.Tensor | slice, dim: int = 1) -> torch.Tensor | None:
    """Select rows of a `[B or 1, S, ...]` table along `dim` (batch-1 tables broadcast)."""
    if t is None:
        return None
    if dim == 0 and t.shape[0] == 1:
        return t
    return t[index] if dim == 0 else t[:, index]


def _full_tables(module: Any, x: torch.Tensor, inputs: ForwardInputs, cos: torch.Tensor | None, sin: torch.Tensor | None) -> Tables:
    """RoPE tables for every row (so the caller can slice them and return them whole)."""
    if module.attn_config.rope is None or not inputs.use_rope or cos is not None:
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
    plan = inputs.write_plan(cache) if positions is inputs.position_ids and valid is inputs.valid else None
    cache.write(seq_ids, k, v, positions, valid, plan)


def context_parallel_prefill(
    module: Any, x: torch.Tensor, inputs: ForwardInputs, cos: torch.Tensor | None, sin: torch.Tensor | None, *, write: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
    """Prefill with the prompt split across the CP group; returns ((hidden, cos, sin), this rank's new (K, V)).

    With `module.sequence_parallel`, x `[B, n_local, hidden]` already holds this rank's
    rows (any split; positions say where they belong) and the output holds the same
    rows. Otherwise x is the whole prompt on every rank: this rank takes its rows
    (`module.cp_split`) and the output is gathered back into prompt order.
    """
    if module.sequence_parallel:
        if inputs.active_mask is not None:
            raise ValueError("active_mask is not supported in a sequence-parallel context-parallel prefill; pass the whole prompt")
        return _cp_attention(module, x, inputs.position_ids, inputs.valid, inputs.rotary_position_ids, cos, sin, inputs, write=write)
    groups = module.groups
    seq = inputs.position_ids.shape[1]
    rows = cp_row_indices(seq, groups.cp_size, groups.cp_rank, module.cp_split).to(x.device)
    take = rows.clamp(min=0)
    cos, sin = _full_tables(module, x, inputs, cos, sin)
    restrict = None
    if inputs.active_mask is not None:  # [B, 1, S, S] -> my queries x every rank's keys, in gathered order
        order = torch.cat([cp_row_indices(seq, groups.cp_size, r, module.cp_split) for r in range(groups.cp_size)]).to(x.device)
        restrict = inputs.active_mask[:, :, take][..., order.clamp(min=0)] & (order >= 0)
    x_local, positions, valid = split_prompt(x, inputs.position_ids, inputs.valid, groups, module.cp_split)
    (local, _, _), new_kv = _cp_attention(
        module, x_local, positions, valid, inputs.rotary_position_ids[:, take], _rows(cos, take), _rows(sin, take), inputs,
        write=write, restrict=restrict,
    )
    return (gather_prompt(local, seq, groups, module.cp_split), cos, sin), new_kv


def _cp_attention(
    module: Any,
    x: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    rotary_positions: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    inputs: ForwardInputs,
    *,
    write: bool,
    restrict: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
    """This rank's rows x `[B, n, hidden]` (the same n on every CP rank) against the group's keys."""
    groups = module.groups
    cp, me = groups.cp_size, groups.cp_rank
    owner, layout, sinks = module.stage_heads(True)
    q, k, v, cos, sin = module.qkv(owner, layout, x, positions, rotary_positions, cos, sin, inputs.adapter_ids, inputs.use_rope)
    k_pos = positions.masked_fill(~valid, -1)
    queries = valid.view(x.shape[0], 1, -1, 1)  # padding queries see nothing
    if restrict is not None:
        queries = queries & restrict
    unit = layout.n_kv // cp  # kv heads of one full-TP unit; mine are block `me`
    own = slice(me * unit, (me + 1) * unit)
    if module.cp_ring:
        out, k_own, v_own, pos_all = _ring_attention(module, q, k, v, k_pos, positions, queries, sinks, own)
    else:
        k_all = torch.cat(comm.all_gather(k, groups.cp), dim=2)  # [B, Hkv, cp * n, D], rank order
        v_all = torch.cat(comm.all_gather(v, groups.cp), dim=2)
        pos_all = torch.cat(comm.all_gather(k_pos, groups.cp), dim=1)
        out = module.attend(q, [(k_all, v_all, pos_all, queries)], positions, sinks)
        k_own, v_own = k_all[:, own], v_all[:, own]
    if write:
        write_cache(module, inputs, k_own, v_own, pos_all, pos_all >= 0, unit=True)
    return (module.output(owner, out, inputs.adapter_ids), cos, sin), (k, v)  # output reduced over the attention-TP group


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass K/V blocks around the CP group, merging partial results by log-sum-exp.

    Returns the output (sinks applied once, after the last merge) and this rank's
    unit of K/V and key positions for every row, in gathered order, for the cache.
    """
    from ..ops.merge import apply_sinks, merge_partials

    groups = module.groups
    cp, me = groups.cp_size, groups.cp_rank
    n_local = k.shape[2]
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
    adapters = None if inputs.adapter_ids is None else inputs.adapter_ids[rows]
    q, k, v, _, _ = module.qkv(
        owner, layout, x[rows], positions, inputs.rotary_position_ids[rows], _rows(cos, rows, 0), _rows(sin, rows, 0), adapters,
        inputs.use_rope,
    )
    queries = valid.view(per, 1, -1, 1)
    mask = queries if inputs.active_mask is None else queries & inputs.active_mask[rows]
    prior_k, prior_v, prior_pos = prior_keys(inputs, local_ids, positions, valid)
    prior_mask = queries if inputs.prior_mask is None else queries & inputs.prior_mask[rows]
    own_k, own_v = (k, v) if cache is None else cache.round_trip(k, v)  # decode reads its own keys as stored, as on one rank
    blocks = [(own_k, own_v, positions.masked_fill(~valid, -1), mask), (prior_k, prior_v, prior_pos, prior_mask)]
    local = module.output(owner, module.attend(q, blocks, positions, sinks), adapters)  # [B / dp, S, hidden]
    hidden = torch.cat(comm.all_gather(local, groups.dp), dim=0)  # replicas in batch order
    if write:
        cache.write(local_ids, k, v, positions, valid)
    return (hidden, cos, sin), (k, v)


def split_prompt(
    hidden_states: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: Any, split: str = "head_tail"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This CP rank's rows of a whole prompt, for a `sequence_parallel` module.

    Args: hidden_states `[B, S, hidden]`, position_ids `[B, S]`, attention_mask `[B, S]` or None.
    Returns: hidden `[B, n, hidden]`, positions `[B, n]`, mask `[B, n]` (padding rows False).
    """
    rows = cp_row_indices(hidden_states.shape[1], groups.cp_size, groups.cp_rank, split).to(hidden_states.device)
    take = rows.clamp(min=0)
    mask = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    return hidden_states[:, take], position_ids[:, take], mask[:, take] & (rows >= 0)


def gather_prompt(local: torch.Tensor, seq_len: int, groups: Any, split: str = "head_tail") -> torch.Tensor:
    """Reassemble a sequence-parallel output `[B, n, hidden]` into prompt order `[B, seq_len, hidden]` on every rank."""
    order = torch.cat([cp_row_indices(seq_len, groups.cp_size, r, split) for r in range(groups.cp_size)]).to(local.device)
    gathered = torch.cat(comm.all_gather(local, groups.cp), dim=1)
    out = gathered.new_zeros(local.shape[0], seq_len, local.shape[-1])
    real = order >= 0
    out[:, order[real]] = gathered[:, real]
    return out
