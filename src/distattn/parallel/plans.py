"""How an attention layer runs under context / data parallelism, applied from outside the layer.

`run_attention(layer, x, step, ...)` is the one entry every caller uses (the decoder, the NxDI
adapter): it zeroes padding, then picks the plan for the step: a context-parallel prefill, a
data-parallel decode, or the layer's own one-process path. The plans call only the layer's
public steps (`stage_heads`, `qkv`, `attend`, `attend_block`, `output`, `rope_tables`).

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

import torch

from ..layers.attention import AttentionLayer, LayerResult, prior_keys
from ..ops.merge import apply_sinks, merge_partials
from ..step.metadata import StepMetadata
from .comm import all_gather, ring_shift
from .groups import ParallelGroups
from .sequence import CPSplit, cp_row_indices, dp_local_rows

Tables = tuple[torch.Tensor | None, torch.Tensor | None]


def run_attention(
    layer: AttentionLayer, x: torch.Tensor, step: StepMetadata, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
    *, write: bool = True,
) -> LayerResult:
    """x `[B, S, hidden]` (normed) through `layer` for the call `step` (bound to the layer's cache):
    (hidden `[B, S, hidden]`, cos, sin, this rank's new (K, V)). write: store the new tokens in the cache."""
    if step.padded:  # padding's bytes (a NaN or Inf included) never reach a projection, a key or a value
        x = x.masked_fill(~step.valid.unsqueeze(-1), 0)
    write = write and step.cache is not None
    groups = layer.groups
    if step.context_encoding and groups.cp_size > 1:
        return context_parallel_prefill(layer, x, step, cos, sin, write=write)
    if not step.context_encoding and groups.dp_size > 1:
        return data_parallel_decode(layer, x, step, cos, sin, write=write)
    if not (write and step.context_encoding and groups.dp_size > 1):
        return layer.attend_here(x, step, cos, sin, write=write)
    hidden, cos, sin, (k, v) = layer.attend_here(x, step, cos, sin, write=False)  # prefill heads: this rank's full-TP unit
    write_cache(layer, step, k, v, step.position_ids, step.valid, unit=True)
    return hidden, cos, sin, (k, v)


def _rows(t: torch.Tensor | None, index: torch.Tensor | slice, dim: int = 1) -> torch.Tensor | None:
    """Select rows of a `[B or 1, S, ...]` table along `dim` (batch-1 tables broadcast)."""
    if t is None:
        return None
    if dim == 0 and t.shape[0] == 1:
        return t
    return t[index] if dim == 0 else t[:, index]


def _full_tables(module: AttentionLayer, x: torch.Tensor, inputs: StepMetadata, cos: torch.Tensor | None, sin: torch.Tensor | None) -> Tables:
    """RoPE tables for every row (so the caller can slice them and return them whole)."""
    if module.attn_config.rope is None or not inputs.use_rope or cos is not None:
        return cos, sin
    return module.rope_tables(x, inputs.rotary_position_ids)


def write_cache(
    module: AttentionLayer, inputs: StepMetadata, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, *, unit: bool
) -> None:
    """Store new K/V `[B, H, S, D]` for every batch row of the call.

    unit=True: the heads are this rank's full-TP unit (any prefill); under data
    parallelism they are gathered across the DP group into the decode layout and
    each replica keeps its own sequences. unit=False: already the decode layout.
    """
    cache, groups = inputs.cache, module.groups
    assert cache is not None  # callers write only to a cache
    seq_ids = inputs.seq_ids if inputs.seq_ids is not None else torch.arange(k.shape[0], device=k.device)
    if unit and groups.dp_size > 1:
        k = torch.cat(all_gather(k, groups.dp), dim=1)  # [B, Hkv_decode, S, D]
        v = torch.cat(all_gather(v, groups.dp), dim=1)
        rows, mine = dp_local_rows(seq_ids, groups.dp_rank, cache.max_batch_size // groups.dp_size)
        if bool(mine.any()):
            cache.write(rows[mine], k[mine], v[mine], positions[mine], valid[mine])
        return
    plan = inputs.write_plan(cache) if positions is inputs.position_ids and valid is inputs.valid else None
    cache.write(seq_ids, k, v, positions, valid, plan)


def context_parallel_prefill(
    module: AttentionLayer, x: torch.Tensor, inputs: StepMetadata, cos: torch.Tensor | None, sin: torch.Tensor | None, *, write: bool
) -> LayerResult:
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
    local, _, _, new_kv = _cp_attention(
        module, x_local, positions, valid, inputs.rotary_position_ids[:, take], _rows(cos, take), _rows(sin, take), inputs,
        write=write, restrict=restrict,
    )
    return gather_prompt(local, seq, groups, module.cp_split), cos, sin, new_kv


def _cp_attention(
    module: AttentionLayer,
    x: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    rotary_positions: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    inputs: StepMetadata,
    *,
    write: bool,
    restrict: torch.Tensor | None = None,
) -> LayerResult:
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
        k_all = torch.cat(all_gather(k, groups.cp), dim=2)  # [B, Hkv, cp * n, D], rank order
        v_all = torch.cat(all_gather(v, groups.cp), dim=2)
        pos_all = torch.cat(all_gather(k_pos, groups.cp), dim=1)
        out = module.attend(q, [(k_all, v_all, pos_all, queries)], positions, sinks)
        k_own, v_own = k_all[:, own], v_all[:, own]
    if write:
        write_cache(module, inputs, k_own, v_own, pos_all, pos_all >= 0, unit=True)
    return module.output(owner, out, inputs.adapter_ids), cos, sin, (k, v)  # output reduced over the attention-TP group


def _ring_attention(
    module: AttentionLayer,
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
    groups = module.groups
    cp, me = groups.cp_size, groups.cp_rank
    n_local = k.shape[2]
    bk, bv, bpos = k, v, k_pos
    merged: tuple[torch.Tensor, torch.Tensor] | None = None
    owned: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # source rank -> its unit's K, V and positions
    for step in range(cp):
        source = (me - step) % cp  # whose rows this block holds
        mask = queries if queries.shape[-1] == 1 else queries[..., source * n_local : (source + 1) * n_local]
        part = module.attend_block(q, bk, bv, q_pos, bpos, mask)
        merged = part if merged is None else merge_partials([merged, part])
        owned[source] = (bk[:, own], bv[:, own], bpos)
        if step < cp - 1:
            bk, bv, bpos = (ring_shift(t, groups.cp) for t in (bk, bv, bpos))
    assert merged is not None  # cp >= 1 blocks
    out, lse = merged
    own_k, own_v, own_pos = ([owned[r][i] for r in range(cp)] for i in range(3))
    if sinks is not None:
        out = apply_sinks(out, lse, sinks)
    return out, torch.cat(own_k, dim=2), torch.cat(own_v, dim=2), torch.cat(own_pos, dim=1)


def data_parallel_decode(
    module: AttentionLayer, x: torch.Tensor, inputs: StepMetadata, cos: torch.Tensor | None, sin: torch.Tensor | None, *, write: bool
) -> LayerResult:
    """Decode with the batch split across DP replicas; returns ((hidden, cos, sin), this replica's new (K, V))."""
    groups, cache = module.groups, inputs.cache
    assert cache is not None  # data-parallel decode reads a cache (checked by the step builder)
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
    own_k, own_v = cache.round_trip(k, v)  # decode reads its own keys as stored, as on one rank
    blocks = [(own_k, own_v, positions.masked_fill(~valid, -1), mask), (prior_k, prior_v, prior_pos, prior_mask)]
    local = module.output(owner, module.attend(q, blocks, positions, sinks), adapters)  # [B / dp, S, hidden]
    hidden = torch.cat(all_gather(local, groups.dp), dim=0)  # replicas in batch order
    if write:
        cache.write(local_ids, k, v, positions, valid)
    return hidden, cos, sin, (k, v)


def split_prompt(
    hidden_states: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None, groups: ParallelGroups, split: CPSplit = "head_tail"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This CP rank's rows of a whole prompt, for a `sequence_parallel` module.

    Args: hidden_states `[B, S, hidden]`, position_ids `[B, S]`, attention_mask `[B, S]` or None.
    Returns: hidden `[B, n, hidden]`, positions `[B, n]`, mask `[B, n]` (padding rows False).
    """
    rows = cp_row_indices(hidden_states.shape[1], groups.cp_size, groups.cp_rank, split).to(hidden_states.device)
    take = rows.clamp(min=0)
    mask = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    return hidden_states[:, take], position_ids[:, take], mask[:, take] & (rows >= 0)


def gather_prompt(local: torch.Tensor, seq_len: int, groups: ParallelGroups, split: CPSplit = "head_tail") -> torch.Tensor:
    """Reassemble a sequence-parallel output `[B, n, hidden]` into prompt order `[B, seq_len, hidden]` on every rank."""
    order = torch.cat([cp_row_indices(seq_len, groups.cp_size, r, split) for r in range(groups.cp_size)]).to(local.device)
    gathered = torch.cat(all_gather(local, groups.cp), dim=1)
    out = gathered.new_zeros(local.shape[0], seq_len, local.shape[-1])
    real = order >= 0
    out[:, order[real]] = gathered[:, real]
    return out
