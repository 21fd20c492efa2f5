"""Checks on forward inputs, run before any KV cache changes.

Each failure is a ValueError (TypeError for a wrong kind of object) that names the
argument and says how to fix it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .config import AttentionConfig
from .kv_cache import KVCacheManager, LayerKVCache  # or their paged counterparts (distattn.paged)
from .ops.masks import first_positions, starts_fresh

FORWARD_EXTRAS = ("seq_ids", "idx")  # the **kwargs forward accepts


@dataclass
class ForwardInputs:
    """forward's inputs after checking, in canonical form."""

    position_ids: torch.Tensor  # [B, S] long
    rotary_position_ids: torch.Tensor  # [B, S] long
    valid: torch.Tensor  # [B, S] bool: real tokens (not padding)
    active_mask: torch.Tensor | None  # [B, 1, S, S] bool
    seq_ids: torch.Tensor | None  # [B] long cache rows
    cache: LayerKVCache | None  # the layer's cache in kv_mgr
    past_key_value: tuple[torch.Tensor, torch.Tensor] | None  # static prior (K, V)
    context_encoding: bool  # no prior keys are read: prefill
    reads_prior: bool  # a prior cache was given and may be read
    adapter_ids: torch.Tensor | None = None  # [B] long LoRA adapter per row (-1: none)
    use_rope: bool = True  # False: this call skips RoPE (an NxDI layer without use_polar_compatible_rope)
    key_mask: torch.Tensor | None = None  # [B, 1, S, L] bool: an NxDI 4-D attention_mask, until resolved
    prior_mask: torch.Tensor | None = None  # [B, 1, S, L] bool: which prior slots each query may see
    padded: bool = False  # some new tokens are padding (valid False): their inputs are zeroed before use
    plain_causal: bool = False  # every row's new tokens at consecutive positions, none padded or masked: their own block is exactly causal
    read_rows: Any = None  # cache rows to read: a slice (consecutive seq_ids) or an index tensor
    write_plans: dict = dataclasses.field(default_factory=dict)  # cache geometry -> WritePlan, made once per call
    layer_plans: dict = dataclasses.field(default_factory=dict)  # layer index -> its cache's WritePlan (plan_writes)
    tables: dict = dataclasses.field(default_factory=dict)  # RoPE settings -> (cos, sin), computed once per call
    kv_mgr: Any = None  # the manager the caches come from (a step binds each layer's)
    layer_idx: int | None = None  # the layer `cache` belongs to

    def write_plan(self, cache: Any) -> Any:
        """Where this call's new tokens go in `cache` (`LayerKVCache.plan`), found once per cache geometry."""
        if cache is self.cache and self.layer_idx in self.layer_plans:  # by layer: no lookup by sizes (compiles dynamic)
            return self.layer_plans[self.layer_idx]
        key = _geometry(cache)
        if key not in self.write_plans:
            self.write_plans[key] = cache.plan(self.seq_ids, self.position_ids, self.valid)
        return self.write_plans[key]

    def plan_writes(self) -> ForwardInputs:
        """Find where this call writes in every layer's cache now (one plan per cache geometry), so the
        layers themselves neither synchronise nor compute a data-dependent shape, and look their plan
        up by layer index, never by sizes (a compiled step stays shape-generic)."""
        by_geometry: dict = {}
        for idx, cache in enumerate(getattr(self.kv_mgr, "layers", [])):
            key = _geometry(cache)
            if key not in by_geometry:
                by_geometry[key] = cache.plan(self.seq_ids, self.position_ids, self.valid)
            self.layer_plans[idx] = by_geometry[key]
        return self

    def rope_tables(self, module: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's RoPE (cos, sin) for `module`'s settings, computed once for all layers that share them."""
        cfg = module.attn_config
        key = (cfg.rope, cfg.rotary_dim, x.dtype, x.device, id(module.rotary_emb) if module.rotary_emb is not None else None)
        if key not in self.tables:
            self.tables[key] = module._rope_tables(x, self.rotary_position_ids)
        return self.tables[key]

    def for_layer(self, kv_mgr: Any, idx: int | None, n_kv_heads: int, config: AttentionConfig, hidden: torch.Tensor) -> ForwardInputs:
        """This call's inputs for another layer of the same model: only its cache changes.

        The checks that depend on the layer (its cache geometry, dtype, device) run here,
        without a host synchronisation; everything else was checked once for the call.
        """
        if kv_mgr is None:
            return self
        cache = kv_mgr.layer(idx)
        check_layer_cache(config, n_kv_heads, cache, hidden)
        return dataclasses.replace(self, cache=cache, layer_idx=idx)


def _geometry(cache: Any) -> tuple:
    """What decides where a call's tokens go in a cache: caches alike share one write plan."""
    return ("paged", id(cache.group)) if getattr(cache, "paged", False) else (cache.cache_len, cache.rolling)


def check_forward_inputs(
    config: AttentionConfig,
    hidden_states: torch.Tensor,
    *,
    param: torch.Tensor,
    n_kv_heads: int,
    read_prior: bool,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_key_value: Any,
    active_mask: torch.Tensor | None,
    adapter_ids: torch.Tensor | None,
    cos_cache: torch.Tensor | None,
    sin_cache: torch.Tensor | None,
    rotary_position_ids: torch.Tensor | None,
    kv_mgr: KVCacheManager | None,
    residual: torch.Tensor | None,
    layer_idx: int | None,
    extra: dict[str, Any],
    n_adapters: int = 0,
    use_rope: bool = True,
) -> ForwardInputs:
    """Check every forward argument.

    `param` (a module weight) gives the expected dtype and device; `n_kv_heads` is the
    number of kv heads this module's caches hold, `n_adapters` the LoRA adapters loaded. The stage is context encoding when no prior keys are read (no
    past_key_value, no kv_mgr or read_prior=False) or every row starts at position 0.
    """
    unknown = set(extra) - set(FORWARD_EXTRAS)
    if unknown:
        raise TypeError(f"forward got unexpected keyword arguments {sorted(unknown)}; accepted extras: {FORWARD_EXTRAS}")
    check_hidden_states(config, hidden_states, param.dtype, param.device)
    batch, seq, _ = hidden_states.shape
    device = hidden_states.device
    adapter_ids = check_adapter_ids(adapter_ids, batch, n_adapters, device)
    tensors = {
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "active_mask": active_mask,
        "rotary_position_ids": rotary_position_ids,
        "residual": residual,
        "cos_cache": cos_cache,
        "sin_cache": sin_cache,
        "seq_ids": extra.get("seq_ids"),
    }
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but hidden_states on {device}; move it with .to({str(device)!r})")
    if residual is not None and residual.dtype != hidden_states.dtype:
        raise ValueError(f"residual dtype {residual.dtype} differs from hidden_states' {hidden_states.dtype}; cast one of them")
    key_mask = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:  # NxDI's [B, 1, S, S or L]
        key_mask, attention_mask = check_key_mask_shape(attention_mask, batch, seq), None
    valid = check_token_mask("attention_mask", attention_mask, batch, seq, device)
    if position_ids is None:
        if past_key_value is not None or kv_mgr is not None:
            raise ValueError("position_ids is required with past_key_value or kv_mgr: pass the new tokens' positions [batch, seq]")
        position_ids = torch.arange(seq, device=device).expand(batch, seq)
    check_position_ids(position_ids, batch, seq, valid)
    position_ids = position_ids.long()
    if rotary_position_ids is not None:
        if not isinstance(rotary_position_ids, torch.Tensor):
            raise TypeError(f"rotary_position_ids must be a tensor [batch, seq], got {type(rotary_position_ids).__name__}")
        if rotary_position_ids.shape != (batch, seq):
            raise ValueError(f"rotary_position_ids has shape {_shape(rotary_position_ids)}, expected [{batch}, {seq}]")
        if rotary_position_ids.dtype.is_floating_point or rotary_position_ids.dtype == torch.bool:
            raise ValueError(f"rotary_position_ids dtype {rotary_position_ids.dtype} must be an integer type (torch.long)")
        if bool((rotary_position_ids < 0).any()):
            raise ValueError("rotary_position_ids has negative values; RoPE positions start at 0")
    rotary = position_ids if rotary_position_ids is None else rotary_position_ids.long()
    restrict = check_active_mask(active_mask, batch, seq)
    check_rope_tables(cos_cache, sin_cache, batch, seq)
    if residual is not None and residual.shape != hidden_states.shape:
        raise ValueError(f"residual has shape {_shape(residual)}, expected {_shape(hidden_states)} like hidden_states")
    seq_ids = check_seq_ids(extra.get("seq_ids"), batch)
    cache = None
    if kv_mgr is not None:
        if not callable(getattr(kv_mgr, "layer", None)) or not hasattr(kv_mgr, "layers"):
            raise TypeError(f"kv_mgr must be a distattn KVCacheManager or PagedKVCacheManager, got {type(kv_mgr).__name__}")
        if past_key_value is not None:
            raise ValueError("pass either kv_mgr or past_key_value, not both")
        idx = extra.get("idx", layer_idx)
        if idx is None:
            raise ValueError("kv_mgr needs the layer index: pass idx=<layer> or build the module with layer_idx")
        cache = kv_mgr.layer(idx)
        check_layer_cache(config, n_kv_heads, cache, hidden_states)
        if seq_ids is not None:
            cache.check_seq_ids(seq_ids)
        elif batch > cache.max_batch_size:
            raise ValueError(
                f"batch {batch} exceeds the KVCacheManager's max_batch_size {cache.max_batch_size}; "
                "pass seq_ids or a larger cache"
            )
        cache.check_positions(position_ids, valid, seq_ids)
    if past_key_value is not None:
        past_key_value = check_past_key_value(past_key_value, batch, n_kv_heads, config.head_dim, device)  # type: ignore[arg-type]
    reads_prior = past_key_value is not None or (cache is not None and read_prior)
    context_encoding = not reads_prior or starts_fresh(first_positions(position_ids, valid))
    padded = not bool(valid.all())
    plain = restrict is None and key_mask is None and not padded and _consecutive(position_ids)
    read_rows = None if cache is None else cache.rows_for(seq_ids, batch)
    return ForwardInputs(
        position_ids, rotary, valid, restrict, seq_ids, cache, past_key_value, context_encoding, reads_prior, adapter_ids,
        use_rope, key_mask, padded=padded, plain_causal=plain, read_rows=read_rows, kv_mgr=kv_mgr, layer_idx=extra.get("idx", layer_idx),
    )


def _consecutive(position_ids: torch.Tensor) -> bool:
    """Every row holds consecutive positions p, p + 1, ... (one check per call)."""
    return bool((position_ids[:, 1:] - position_ids[:, :-1] == 1).all())


def check_key_mask_shape(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """An NxDI 4-D attention mask `[B, 1, S, L]` (bool or 0/1, True = may attend) as bool."""
    if mask.shape[0] != batch or mask.shape[1] != 1 or mask.shape[2] != seq:
        raise ValueError(
            f"attention_mask has shape {_shape(mask)}; a 4-D mask must be [batch, 1, seq, keys] = [{batch}, 1, {seq}, keys] "
            "(NxDI's [B, 1, S, S] in context encoding, [B, 1, S, cache length] in token generation), or pass [batch, seq]"
        )
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(
                "attention_mask must be bool or hold only 0 and 1 (True = the query may attend); "
                "additive float masks (0 / -inf) are not accepted: pass mask == 0"
            )
        mask = mask != 0
    return mask


def resolve_key_mask(inputs: ForwardInputs) -> ForwardInputs:
    """Give an NxDI 4-D attention_mask its meaning once the stage is known.

    Context encoding: `[B, 1, S, S]` over the new tokens, a further restriction on top
    of the position rules (like active_mask). Token generation: `[B, 1, S, L]` over the
    prior cache's L slots (past_key_value: slot j = position j; a KVCacheManager layer:
    its slots), restricting which prior keys each new token sees.
    """
    mask = inputs.key_mask
    if mask is None:
        return inputs
    batch, seq = inputs.position_ids.shape
    if inputs.context_encoding:
        if mask.shape[3] != seq:
            raise ValueError(
                f"attention_mask has shape {_shape(mask)} in context encoding; expected [{batch}, 1, {seq}, {seq}] over the new tokens"
            )
        restrict = mask if inputs.active_mask is None else mask & inputs.active_mask
        return dataclasses.replace(inputs, active_mask=restrict, key_mask=None)
    if inputs.past_key_value is not None:
        slots = inputs.past_key_value[0].shape[2]
    elif getattr(inputs.cache, "paged", False):
        raise ValueError("a 4-D attention_mask over cache slots does not apply to a paged KV cache; positions decide what each query sees")
    else:
        slots = inputs.cache.k.shape[2]  # type: ignore[union-attr]
    if mask.shape[3] != slots:
        raise ValueError(
            f"attention_mask has shape {_shape(mask)} in token generation; expected [{batch}, 1, {seq}, {slots}] "
            f"over the {slots} prior cache slots"
        )
    return dataclasses.replace(inputs, prior_mask=mask, key_mask=None)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_hidden_states(
    config: AttentionConfig, hidden_states: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> None:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a tensor [batch, seq, {config.hidden_size}], got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != config.hidden_size:
        raise ValueError(
            f"hidden_states has shape {_shape(hidden_states)}, expected [batch, seq, {config.hidden_size}] "
            f"(hidden_size of this layer)"
        )
    if hidden_states.shape[0] == 0 or hidden_states.shape[1] == 0:
        raise ValueError(f"hidden_states has shape {_shape(hidden_states)}: batch and seq must be non-empty")
    if hidden_states.dtype != dtype:
        raise ValueError(
            f"hidden_states dtype {hidden_states.dtype} differs from the module's {dtype}; "
            f"cast with hidden_states.to({dtype}) or the module with .to(dtype)"
        )
    if hidden_states.device != device:
        raise ValueError(f"hidden_states is on {hidden_states.device}, the module on {device}; move one of them")


def check_position_ids(position_ids: torch.Tensor, batch: int, seq: int, valid: torch.Tensor) -> None:
    """position_ids `[B, S]`, integer, non-negative, unique among a row's valid tokens."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape != (batch, seq):
        got = _shape(position_ids) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids has shape {got}, expected [batch, seq] = [{batch}, {seq}]")
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids dtype {position_ids.dtype} must be an integer type (torch.long)")
    if bool((position_ids[valid] < 0).any()):
        raise ValueError(f"position_ids has negative values {position_ids.tolist()}; positions start at 0")
    if seq > 1:
        ordered = torch.sort(torch.where(valid, position_ids, -1 - torch.arange(seq, device=position_ids.device)), dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError(
                f"position_ids repeats a position within a row: {position_ids.tolist()}; "
                "each token of a sequence needs its own position"
            )


def check_token_mask(
    name: str, mask: torch.Tensor | None, batch: int, seq: int, device: torch.device
) -> torch.Tensor:
    """A `[B, S]` padding mask (bool or 0/1) as bool; all True when None."""
    if mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.shape != (batch, seq):
        got = _shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"{name} has shape {got}, expected [batch, seq] = [{batch}, {seq}] "
            "(True/1 for real tokens, False/0 for padding); masks over keys come from positions"
        )
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must be bool or hold only 0 and 1")
        mask = mask != 0
    return mask


def check_active_mask(active_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """Optional restriction among the new tokens: `[B, 1, S, S]` or `[B, S, S]` -> bool `[B, 1, S, S]`."""
    if active_mask is None:
        return None
    if not isinstance(active_mask, torch.Tensor) or active_mask.dim() not in (3, 4):
        raise ValueError("active_mask must be a tensor [batch, 1, seq, seq] (True = the query may see that new token)")
    if active_mask.dim() == 3:
        active_mask = active_mask.unsqueeze(1)
    if active_mask.shape != (batch, 1, seq, seq):
        raise ValueError(f"active_mask has shape {_shape(active_mask)}, expected [{batch}, 1, {seq}, {seq}]")
    if active_mask.dtype != torch.bool and (active_mask.dtype.is_floating_point or bool(((active_mask != 0) & (active_mask != 1)).any())):
        raise ValueError(
            f"active_mask must be bool or hold only 0 and 1 (True / 1 = may attend), got {active_mask.dtype}; "
            "an additive float mask (0 / -inf) reads inverted: pass (mask == 0) instead"
        )
    return active_mask != 0


def check_adapter_ids(adapter_ids: Any, batch: int, n_adapters: int, device: torch.device) -> torch.Tensor | None:
    """adapter_ids `[B]` (or `[B, 1]`) integers in [-1, n_adapters) -> long `[B]`; None when no row uses an adapter."""
    if adapter_ids is None:
        return None
    if not isinstance(adapter_ids, torch.Tensor):
        adapter_ids = torch.as_tensor(adapter_ids)
    if adapter_ids.dim() == 2 and adapter_ids.shape[1] == 1:
        adapter_ids = adapter_ids.reshape(-1)
    if adapter_ids.shape != (batch,) or adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool:
        raise ValueError(
            f"adapter_ids must be an integer tensor [batch] = [{batch}] (index of each row's LoRA adapter, -1 for none), "
            f"got {_shape(adapter_ids)} {adapter_ids.dtype}"
        )
    if adapter_ids.device != device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but hidden_states on {device}; move it with .to({str(device)!r})")
    if adapter_ids.numel() and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= n_adapters):
        if n_adapters == 0:
            raise ValueError(
                f"adapter_ids {adapter_ids.tolist()} selects LoRA adapters but none are loaded; "
                "call load_lora_adapters first or pass -1 / None"
            )
        raise ValueError(f"adapter_ids {adapter_ids.tolist()} has an id outside [-1, {n_adapters}): {n_adapters} adapters are loaded, -1 means none")
    return adapter_ids.long()


def check_seq_ids(seq_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if seq_ids is None:
        return None
    if not isinstance(seq_ids, torch.Tensor):
        seq_ids = torch.as_tensor(seq_ids)
    seq_ids = seq_ids.reshape(-1) if seq_ids.dim() == 2 and seq_ids.shape[1] == 1 else seq_ids
    if seq_ids.shape != (batch,) or seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise ValueError(f"seq_ids must be an integer tensor [batch] = [{batch}], got {_shape(seq_ids)} {seq_ids.dtype}")
    if seq_ids.unique().numel() != batch:
        raise ValueError(f"seq_ids {seq_ids.tolist()} has duplicates; each batch row needs its own cache row")
    return seq_ids.long()


def check_layer_cache(config: AttentionConfig, n_kv_heads: int, cache: LayerKVCache, hidden: torch.Tensor) -> None:
    """The cache holds this layer's kv heads and head_dim, on the module's device."""
    _, heads, _, head_dim = cache.k.shape
    if heads != n_kv_heads or head_dim != config.head_dim:
        raise ValueError(
            f"kv_mgr layer cache is [*, {heads}, *, {head_dim}] but this layer needs "
            f"[*, {n_kv_heads}, *, {config.head_dim}] (n_kv_heads, head_dim); build the KVCacheManager "
            "from this layer's AttentionConfig"
        )
    if cache.dtype != hidden.dtype:
        raise ValueError(
            f"kv_mgr caches are {cache.dtype} but this layer computes in {hidden.dtype}; "
            f"build the KVCacheManager with dtype={hidden.dtype}"
        )
    if cache.k.device != hidden.device:
        raise ValueError(f"kv_mgr caches are on {cache.k.device}, hidden_states on {hidden.device}; move one of them")


def check_past_key_value(
    past_key_value: object, batch: int, n_kv_heads: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """NxDI-style prior cache: (K, V), each `[B, n_kv_heads, L, head_dim]`, slot j = position j."""
    if not isinstance(past_key_value, (tuple, list)) or len(past_key_value) != 2:
        raise ValueError("past_key_value must be a pair (K, V) of tensors [batch, n_kv_heads, len, head_dim]")
    k, v = past_key_value
    for name, t in (("K", k), ("V", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != batch or t.shape[1] != n_kv_heads or t.shape[3] != head_dim:
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"past_key_value {name} has shape {got}, expected [{batch}, {n_kv_heads}, len, {head_dim}]"
            )
    if k.shape != v.shape:
        raise ValueError(f"past_key_value K {_shape(k)} and V {_shape(v)} differ in shape")
    if k.device != device or v.device != device:
        raise ValueError(f"past_key_value is on {k.device} but hidden_states on {device}; move it with .to({str(device)!r})")
    return k, v


def check_rope_tables(cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None, batch: int, seq: int) -> None:
    if (cos_cache is None) != (sin_cache is None):
        raise ValueError("cos_cache and sin_cache go together: pass both or neither")
    if cos_cache is None:
        return
    for name, t in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seq:
            raise ValueError(f"{name} has shape {_shape(t)}, expected [batch or 1, {seq}, rotary width]")


def check_rolling_rewind(inputs: ForwardInputs, caches: Any) -> None:
    """A call that continues rows of rolling window caches may go back only as far as they keep
    (`LayerKVCache.check_rewind`); once per rolling geometry among `caches`, not per layer."""
    if inputs.cache is None or not inputs.reads_prior or inputs.context_encoding or getattr(inputs.kv_mgr, "dp_size", 1) > 1:
        return  # (data-parallel replicas hold other rows: each replica's positions are not all here)
    rolling = {(c.cache_len, c.max_new_tokens): c for c in caches if getattr(c, "rolling", False)}
    for cache in rolling.values():
        cache.check_rewind(inputs.position_ids, inputs.valid, inputs.seq_ids)


def check_data_parallel_decode(inputs: ForwardInputs, dp_size: int) -> None:
    """A data-parallel decode needs the KV cache manager and a batch that splits evenly."""
    if dp_size == 1 or inputs.context_encoding:
        return
    if inputs.cache is None:
        raise ValueError("data-parallel decode reads each replica's KVCacheManager: pass kv_mgr, not past_key_value")
    if getattr(inputs.cache, "paged", False):
        raise ValueError("the paged KV cache does not support data-parallel decode; use KVCacheManager(dp_size=...) for it")
    batch = inputs.position_ids.shape[0]
    if batch % dp_size:
        raise ValueError(f"batch {batch} must divide by the data-parallel degree {dp_size} for decode; pad the batch")
    # replica r decodes batch rows [r * per, (r + 1) * per) from its cache rows: seq_ids [r * R, (r + 1) * R)
    per, rows = batch // dp_size, inputs.cache.max_batch_size // dp_size
    seq_ids = inputs.seq_ids if inputs.seq_ids is not None else torch.arange(batch, device=inputs.position_ids.device)
    replica = torch.arange(batch, device=seq_ids.device) // per
    foreign = ((seq_ids < replica * rows) | (seq_ids >= (replica + 1) * rows)) & inputs.valid.any(dim=1)
    if bool(foreign.any()):
        b = int(foreign.nonzero()[0, 0])
        raise ValueError(
            f"seq_ids: batch row {b} (decoded by data-parallel replica {int(replica[b])}) has seq_id {int(seq_ids[b])}, whose "
            f"cache row belongs to replica {int(seq_ids[b]) // rows} (replica r holds seq_ids [r * {rows}, (r + 1) * {rows})); "
            f"order the batch so each replica's {per} rows carry its own seq_ids, or mark a filler row as padding "
            "(attention_mask all False: NxDI's garbage-row padding)"
        )
