"""What one model call is: positions, validity, rows, masks, write plans and RoPE tables, found once.

`StepMetadata` is built by `distattn.step.builder.build_step` (every check and host sync of a
call happens there, once) and handed to every layer, which only computes from it (vLLM's
attention metadata, SGLang's forward batch). It is frozen: a layer never changes the call's
facts, it only binds its own cache (`for_layer`). Two memos fill lazily, keyed by value, so
layers that share settings share the work: write plans by cache geometry, RoPE tables by the
RoPE settings that made them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache.static import LayerStack
from ..cache.store import KVStore

RopeTables = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [B, S, R or R/2]


class WritePlans:
    """Where a call's new tokens go, per cache geometry (`KVStore.geometry`), and per layer index.

    A plan made before the layers run (`plan_all`) is looked up by layer index, never by sizes,
    so a compiled step stays shape-generic and the layers neither synchronise nor compute a
    data-dependent shape."""

    def __init__(self) -> None:
        self.by_geometry: dict[Hashable, Any] = {}
        self.by_layer: dict[int, Any] = {}

    def get(self, cache: KVStore, step: StepMetadata) -> Any:
        """The plan for `cache` (made on first use for its geometry)."""
        key = cache.geometry()
        if key not in self.by_geometry:
            self.by_geometry[key] = cache.plan(step.seq_ids, step.position_ids, step.valid)
        return self.by_geometry[key]

    def plan_all(self, caches: list[KVStore], step: StepMetadata) -> None:
        """Plan every layer's writes now (one plan per geometry)."""
        for idx, cache in enumerate(caches):
            self.by_layer[idx] = self.get(cache, step)


class RopeMemo:
    """A call's RoPE tables, computed once for all layers that share the settings (`key`)."""

    def __init__(self) -> None:
        self.tables: dict[Hashable, RopeTables] = {}

    def get(self, key: Hashable, compute: Callable[[], RopeTables]) -> RopeTables:
        if key not in self.tables:
            self.tables[key] = compute()
        return self.tables[key]


@dataclass(frozen=True)
class StepMetadata:
    """One model call's facts, checked and in canonical form (shapes: B rows, S new tokens, L cache slots)."""

    position_ids: torch.Tensor  # [B, S] long
    rotary_position_ids: torch.Tensor  # [B, S] long
    valid: torch.Tensor  # [B, S] bool: real tokens (not padding)
    active_mask: torch.Tensor | None  # [B, 1, S, S] bool
    seq_ids: torch.Tensor | None  # [B] long cache rows
    cache: KVStore | None  # the bound layer's cache in kv_mgr
    past_key_value: tuple[torch.Tensor, torch.Tensor] | None  # static prior (K, V)
    context_encoding: bool  # no prior keys are read: prefill
    reads_prior: bool  # a prior cache was given and may be read
    adapter_ids: torch.Tensor | None = None  # [B] long LoRA adapter per row (-1: none)
    use_rope: bool = True  # False: this call skips RoPE (an NxDI layer without use_polar_compatible_rope)
    key_mask: torch.Tensor | None = None  # [B, 1, S, L] bool: an NxDI 4-D attention_mask, until resolved
    prior_mask: torch.Tensor | None = None  # [B, 1, S, L] bool: which prior slots each query may see
    padded: bool = False  # some new tokens are padding (valid False): their inputs are zeroed before use
    plain_causal: bool = False  # every row's new tokens at consecutive positions, none padded or masked: their own block is exactly causal
    read_rows: Any = None  # cache rows to read: a slice (consecutive seq_ids), an index tensor, or a list (paged)
    kv_mgr: LayerStack | None = None  # the manager the caches come from (a step binds each layer's)
    layer_idx: int | None = None  # the layer `cache` belongs to
    plans: WritePlans = field(default_factory=WritePlans)
    rope: RopeMemo = field(default_factory=RopeMemo)

    def write_plan(self, cache: KVStore) -> Any:
        """Where this call's new tokens go in `cache` (`KVStore.plan`): the bound layer's plan made
        before the layers ran, else the one of its geometry."""
        if cache is self.cache and self.layer_idx in self.plans.by_layer:
            return self.plans.by_layer[self.layer_idx]
        return self.plans.get(cache, self)

    def plan_writes(self) -> StepMetadata:
        """Find where this call writes in every layer's cache now (one plan per cache geometry)."""
        if self.kv_mgr is not None:
            self.plans.plan_all(self.kv_mgr.layers, self)
        return self

    def rope_tables(self, key: Hashable, compute: Callable[[torch.Tensor], RopeTables]) -> RopeTables:
        """The call's RoPE (cos, sin) for the settings `key`: `compute(rotary_position_ids)` once per call."""
        return self.rope.get(key, lambda: compute(self.rotary_position_ids))

    def for_layer(self, idx: int | None, cache: KVStore | None) -> StepMetadata:
        """This call's facts bound to another layer's cache (checked by the caller, `builder.bind_layer`)."""
        if cache is None:
            return self
        return dataclasses.replace(self, cache=cache, layer_idx=idx)

    def with_stage(self, context_encoding: bool) -> StepMetadata:
        """The same call with its stage decided elsewhere (a sequence-parallel prefill, over the CP group)."""
        return dataclasses.replace(self, context_encoding=context_encoding)

    def with_masks(self, active_mask: torch.Tensor | None, prior_mask: torch.Tensor | None) -> StepMetadata:
        """The same call once an NxDI 4-D mask got its meaning (a restriction among new tokens or over prior slots)."""
        return dataclasses.replace(self, active_mask=active_mask, prior_mask=prior_mask, key_mask=None)
