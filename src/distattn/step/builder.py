"""Build a call's `StepMetadata`: every check and every host sync of a model call, once.

`build_step(call, layer, groups)` checks the forward's arguments (`CallArgs`) against the layer
they are phrased for (`LayerFacts`: its config, dtype, device, cache heads), decides the
stage (context encoding or token generation; over the CP group for a sequence-parallel
prefill), gives an NxDI 4-D mask its meaning, checks rolling caches and data-parallel
routing, and plans every cache write. Nothing changes before it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache.static import LayerStack
from ..cache.store import KVStore
from ..config import AttentionConfig
from ..ops.masks import first_positions, starts_fresh
from ..parallel.comm import all_reduce_min
from ..parallel.groups import ParallelGroups
from .checks import (
    check_active_mask,
    check_adapter_ids,
    check_hidden_states,
    check_key_mask_shape,
    check_layer_cache,
    check_past_key_value,
    check_position_ids,
    check_rope_tables,
    check_seq_ids,
    check_token_mask,
    shape_of,
)
from .metadata import StepMetadata

FORWARD_EXTRAS = ("seq_ids", "idx")  # the **kwargs forward accepts


@dataclass(frozen=True)
class LayerFacts:
    """What checking a call needs of the layer its arguments are phrased for."""

    config: AttentionConfig
    dtype: torch.dtype  # the layer's compute dtype
    device: torch.device
    n_kv_heads: int  # kv heads this layer's caches hold
    n_adapters: int = 0  # LoRA adapters loaded
    layer_idx: int | None = None  # default `idx` for the cache manager


@dataclass
class CallArgs:
    """A forward call's arguments as given (see `NeuronAttentionBase.forward`)."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    past_key_value: Any = None
    active_mask: torch.Tensor | None = None
    adapter_ids: Any = None
    cos_cache: torch.Tensor | None = None
    sin_cache: torch.Tensor | None = None
    rotary_position_ids: torch.Tensor | None = None
    kv_mgr: Any = None
    residual: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # seq_ids, idx
    read_prior: bool = True  # get_kv_per_layer
    use_rope: bool = True


def build_step(
    call: CallArgs, layer: LayerFacts, groups: ParallelGroups | None = None, *, sequence_parallel: bool = False,
    this_layer_only: bool = False,
) -> StepMetadata:
    """Check one call and describe it once (TypeError / ValueError naming the argument otherwise).

    this_layer_only: the call is this layer alone: of the manager's caches, check only its own
    (the model's earlier layers already hold this call's tokens).
    """
    groups = groups if groups is not None else ParallelGroups()
    step = check_call(call, layer)
    if sequence_parallel and groups.cp_size > 1 and step.reads_prior:  # rows are split: decide the stage together
        starts = all_reduce_min(first_positions(step.position_ids, step.valid), groups.cp)
        step = step.with_stage(starts_fresh(starts))
    check_data_parallel_decode(step, groups.dp_size)
    caches = [] if step.kv_mgr is None else step.kv_mgr.layers
    check_continuation(step, [step.cache] if this_layer_only and step.cache is not None else caches)
    step = resolve_key_mask(step)
    if step.cache is None or groups.cp_size > 1 or groups.dp_size > 1:
        return step  # the CP / DP plans write their own rows and positions, not the call's
    return step.plan_writes()


def bind_layer(step: StepMetadata, idx: int | None, config: AttentionConfig, n_kv_heads: int, hidden: torch.Tensor) -> StepMetadata:
    """A model's step for layer `idx` (its config, its caches' kv heads): only the cache changes, checked without a
    host sync (a layer's cheap facts only: this runs once per layer per step)."""
    if step.kv_mgr is None:
        return step
    if idx is None:
        raise ValueError("kv_mgr needs the layer index: pass idx=<layer> or build the module with layer_idx")
    cache = step.kv_mgr.layer(idx)
    check_layer_cache(config, n_kv_heads, cache, hidden)
    return step.for_layer(idx, cache)


def check_call(call: CallArgs, layer: LayerFacts) -> StepMetadata:
    """Every argument checked (the stage: context encoding when no prior keys are read, or every row starts at 0)."""
    unknown = set(call.extra) - set(FORWARD_EXTRAS)
    if unknown:
        raise TypeError(f"forward got unexpected keyword arguments {sorted(unknown)}; accepted extras: {FORWARD_EXTRAS}")
    hidden = call.hidden_states
    check_hidden_states(layer.config, hidden, layer.dtype, layer.device)
    batch, seq, _ = hidden.shape
    adapter_ids = check_adapter_ids(call.adapter_ids, batch, layer.n_adapters, hidden.device)
    _check_devices(call)
    key_mask, attention_mask = _split_mask(call.attention_mask, batch, seq)
    valid = check_token_mask("attention_mask", attention_mask, batch, seq, hidden.device)
    position_ids, rotary = _positions(call, batch, seq, valid)
    restrict = check_active_mask(call.active_mask, batch, seq)
    check_rope_tables(call.cos_cache, call.sin_cache, batch, seq)
    if call.residual is not None and call.residual.shape != hidden.shape:
        raise ValueError(f"residual has shape {shape_of(call.residual)}, expected {shape_of(hidden)} like hidden_states")
    seq_ids = check_seq_ids(call.extra.get("seq_ids"), batch)
    idx = call.extra.get("idx", layer.layer_idx)
    cache = _layer_cache(call, layer, idx, seq_ids, position_ids, valid)
    past = None if call.past_key_value is None else check_past_key_value(
        call.past_key_value, batch, layer.n_kv_heads, layer.config.head_dim, hidden.device)
    reads_prior = past is not None or (cache is not None and call.read_prior)
    padded = not bool(valid.all())
    return StepMetadata(
        position_ids, rotary, valid, restrict, seq_ids, cache, past,
        context_encoding=not reads_prior or starts_fresh(first_positions(position_ids, valid)), reads_prior=reads_prior,
        adapter_ids=adapter_ids, use_rope=call.use_rope, key_mask=key_mask, padded=padded,
        plain_causal=restrict is None and key_mask is None and not padded and _consecutive(position_ids),
        read_rows=None if cache is None else cache.rows_for(seq_ids, batch), kv_mgr=call.kv_mgr, layer_idx=idx,
    )


def _check_devices(call: CallArgs) -> None:
    """Every tensor argument on hidden_states' device; residual in its dtype."""
    device = call.hidden_states.device
    tensors = {
        "attention_mask": call.attention_mask, "position_ids": call.position_ids, "active_mask": call.active_mask,
        "rotary_position_ids": call.rotary_position_ids, "residual": call.residual, "cos_cache": call.cos_cache,
        "sin_cache": call.sin_cache, "seq_ids": call.extra.get("seq_ids"),
    }
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but hidden_states on {device}; move it with .to({str(device)!r})")
    if call.residual is not None and call.residual.dtype != call.hidden_states.dtype:
        raise ValueError(f"residual dtype {call.residual.dtype} differs from hidden_states' {call.hidden_states.dtype}; cast one of them")


def _split_mask(mask: torch.Tensor | None, batch: int, seq: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(NxDI 4-D mask `[B, 1, S, S or L]` as bool, 2-D padding mask): one of them is None."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        return check_key_mask_shape(mask, batch, seq), None
    return None, mask


def _positions(call: CallArgs, batch: int, seq: int, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, RoPE positions), long `[B, S]`; positions default to 0..S-1 without a prior cache."""
    position_ids = call.position_ids
    if position_ids is None:
        if call.past_key_value is not None or call.kv_mgr is not None:
            raise ValueError("position_ids is required with past_key_value or kv_mgr: pass the new tokens' positions [batch, seq]")
        position_ids = torch.arange(seq, device=call.hidden_states.device).expand(batch, seq)
    check_position_ids(position_ids, batch, seq, valid)
    rotary = call.rotary_position_ids
    if rotary is None:
        return position_ids.long(), position_ids.long()
    if not isinstance(rotary, torch.Tensor):
        raise TypeError(f"rotary_position_ids must be a tensor [batch, seq], got {type(rotary).__name__}")
    if rotary.shape != (batch, seq):
        raise ValueError(f"rotary_position_ids has shape {shape_of(rotary)}, expected [{batch}, {seq}]")
    if rotary.dtype.is_floating_point or rotary.dtype == torch.bool:
        raise ValueError(f"rotary_position_ids dtype {rotary.dtype} must be an integer type (torch.long)")
    if bool((rotary < 0).any()):
        raise ValueError("rotary_position_ids has negative values; RoPE positions start at 0")
    return position_ids.long(), rotary.long()


def _layer_cache(
    call: CallArgs, layer: LayerFacts, idx: int | None, seq_ids: torch.Tensor | None, positions: torch.Tensor, valid: torch.Tensor
) -> KVStore | None:
    """The cache of layer `idx` in `kv_mgr`, with the call's rows and positions checked against it."""
    kv_mgr = call.kv_mgr
    if kv_mgr is None:
        return None
    if not isinstance(kv_mgr, LayerStack):
        raise TypeError(f"kv_mgr must be a distattn KVCacheManager or PagedKVCacheManager, got {type(kv_mgr).__name__}")
    if call.past_key_value is not None:
        raise ValueError("pass either kv_mgr or past_key_value, not both")
    if idx is None:
        raise ValueError("kv_mgr needs the layer index: pass idx=<layer> or build the module with layer_idx")
    cache: KVStore = kv_mgr.layer(idx)
    check_layer_cache(layer.config, layer.n_kv_heads, cache, call.hidden_states)
    batch = positions.shape[0]
    if seq_ids is not None:
        cache.check_seq_ids(seq_ids)
    elif batch > cache.max_batch_size:
        raise ValueError(f"batch {batch} exceeds the KVCacheManager's max_batch_size {cache.max_batch_size}; pass seq_ids or a larger cache")
    cache.check_positions(positions, valid, seq_ids)
    return cache


def _consecutive(position_ids: torch.Tensor) -> bool:
    """Every row holds consecutive positions p, p + 1, ... (one check per call)."""
    return bool((position_ids[:, 1:] - position_ids[:, :-1] == 1).all())


def resolve_key_mask(step: StepMetadata) -> StepMetadata:
    """Give an NxDI 4-D attention_mask its meaning once the stage is known.

    Context encoding: `[B, 1, S, S]` over the new tokens, a further restriction on top
    of the position rules (like active_mask). Token generation: `[B, 1, S, L]` over the
    prior cache's L slots (past_key_value: slot j = position j; a KVCacheManager layer:
    its slots), restricting which prior keys each new token sees.
    """
    mask = step.key_mask
    if mask is None:
        return step
    batch, seq = step.position_ids.shape
    if step.context_encoding:
        if mask.shape[3] != seq:
            raise ValueError(
                f"attention_mask has shape {shape_of(mask)} in context encoding; expected [{batch}, 1, {seq}, {seq}] over the new tokens"
            )
        return step.with_masks(mask if step.active_mask is None else mask & step.active_mask, None)
    if step.past_key_value is not None:
        slots = step.past_key_value[0].shape[2]
    elif step.cache is not None and step.cache.paged:
        raise ValueError("a 4-D attention_mask over cache slots does not apply to a paged KV cache; positions decide what each query sees")
    else:
        assert step.cache is not None  # token generation reads a prior cache
        slots = step.cache.k.shape[2]
    if mask.shape[3] != slots:
        raise ValueError(
            f"attention_mask has shape {shape_of(mask)} in token generation; expected [{batch}, 1, {seq}, {slots}] "
            f"over the {slots} prior cache slots"
        )
    return step.with_masks(step.active_mask, mask)


def check_continuation(step: StepMetadata, caches: list[KVStore]) -> None:
    """A call that continues rows may start at most one past what their caches hold, and go back only as far as
    rolling caches keep (`LayerKVCache.check_rewind`); once per geometry among `caches`, not per layer."""
    data_parallel = step.kv_mgr is not None and step.kv_mgr.dp_size > 1
    if step.cache is None or not step.reads_prior or step.context_encoding or data_parallel:
        return  # (data-parallel replicas hold other rows: each replica's positions are not all here)
    by_geometry = {(c.geometry(), c.max_new_tokens): c for c in caches if not c.paged}
    for cache in by_geometry.values():
        cache.check_rewind(step.position_ids, step.valid, step.seq_ids)


def check_data_parallel_decode(step: StepMetadata, dp_size: int) -> None:
    """A data-parallel decode needs the KV cache manager, a batch that splits evenly and rows routed to their replica."""
    if dp_size == 1 or step.context_encoding:
        return
    if step.cache is None:
        raise ValueError("data-parallel decode reads each replica's KVCacheManager: pass kv_mgr, not past_key_value")
    if step.cache.paged:
        raise ValueError("the paged KV cache does not support data-parallel decode; use KVCacheManager(dp_size=...) for it")
    batch = step.position_ids.shape[0]
    if batch % dp_size:
        raise ValueError(f"batch {batch} must divide by the data-parallel degree {dp_size} for decode; pad the batch")
    # replica r decodes batch rows [r * per, (r + 1) * per) from its cache rows: seq_ids [r * R, (r + 1) * R)
    per, rows = batch // dp_size, step.cache.max_batch_size // dp_size
    seq_ids = step.seq_ids if step.seq_ids is not None else torch.arange(batch, device=step.position_ids.device)
    replica = torch.arange(batch, device=seq_ids.device) // per
    foreign = ((seq_ids < replica * rows) | (seq_ids >= (replica + 1) * rows)) & step.valid.any(dim=1)
    if bool(foreign.any()):
        b = int(foreign.nonzero()[0, 0])
        raise ValueError(
            f"seq_ids: batch row {b} (decoded by data-parallel replica {int(replica[b])}) has seq_id {int(seq_ids[b])}, whose "
            f"cache row belongs to replica {int(seq_ids[b]) // rows} (replica r holds seq_ids [r * {rows}, (r + 1) * {rows})); "
            f"order the batch so each replica's {per} rows carry its own seq_ids, or mark a filler row as padding "
            "(attention_mask all False: NxDI's garbage-row padding)"
        )
