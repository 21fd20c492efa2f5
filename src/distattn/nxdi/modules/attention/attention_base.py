"""NxDI's `attention_base`: `NeuronAttentionBase` (constructor and 14-argument forward), its output and `QKNormPlacement`.

`NeuronAttentionBase` adapts distattn's `AttentionLayer` (`distattn.layers.attention`) to NxDI's
calling convention: built from an `AttentionConfig` (distattn's form) or from NxDI's
`InferenceConfig` and keywords (NxDI's form), it checks each call's arguments into a step
(`distattn.step.builder`), runs the layer through `distattn.parallel.plans.run_attention`
and returns `NeuronAttentionBaseOutput`. It is also `distattn.NeuronAttentionBase`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ....config import AttentionConfig
from ....layers.attention import AttentionLayer
from ....output import NeuronAttentionBaseOutput
from ....parallel.groups import ParallelGroups
from ....parallel.layout import GQAStrategy
from ....parallel.plans import run_attention
from ....parallel.sequence import CPSplit
from ....step.builder import CallArgs, bind_layer, build_step
from ....step.checks import check_rope_tables
from ....step.metadata import StepMetadata
from ...form import NxdiForm, QKNormPlacement, nxdi_forward_options, set_nxdi_attributes
from ...layer import nxdi_layer
from ..custom_calls import CustomRMSNorm

__all__ = ["NeuronAttentionBase", "NeuronAttentionBaseOutput", "QKNormPlacement"]


class NeuronAttentionBase(AttentionLayer):
    """GQA attention for LLM inference with NxDI's constructor and forward signature.

    Two constructors:

    - `NeuronAttentionBase(AttentionConfig(...), groups=..., dtype=...)`, distattn's own
      (the keywords of `distattn.layers.attention.AttentionLayer`).
    - NxDI's: `NeuronAttentionBase(config=inference_config, hidden_size=..., num_attention_heads=...,
      ...)` with an NxDI-style `InferenceConfig` (`distattn.nxdi.models.config`) and NxDI's
      keywords (`*args`: hidden_size, num_attention_heads, num_key_value_heads by position;
      `**nxdi_keywords`: the rest, see `distattn.nxdi.layer.KEYWORDS`). The parallel layout
      and dtype come from `config.neuron_config`; `self.config` is that InferenceConfig and
      the forward gives `rmsnorm`, `residual`, 4-D masks and `use_polar_compatible_rope`
      NxDI's meaning (`distattn.nxdi.form.NxdiForm`). `self.attn_config` is the layer's
      AttentionConfig in both forms.

    forward(...) attends the new tokens to themselves and to the prior KV; its arguments:

    - `hidden_states`: `[B, S, hidden_size]` new tokens (before `rmsnorm`, if given).
    - `attention_mask`: `[B, S]` padding mask of the new tokens (True/1 = real). Padding is
      neither attended to nor cached, and its attention output is zero. Key
      visibility otherwise comes from positions (causal, window, chunk). Or NxDI's
      4-D bool mask, a further restriction: `[B, 1, S, S]` over the new tokens in
      context encoding, `[B, 1, S, L]` over the prior cache's L slots in decode.
    - `position_ids`: `[B, S]` positions of the new tokens; default 0..S-1 (prefill).
    - `past_key_value`: prior (K, V) `[B, Hkv, L, D]`, slot j holding position j.
    - `active_mask`: `[B, 1, S, S]` bool, further restriction among the new tokens.
    - `adapter_ids`: `[B]` LoRA adapter of each row: an index into the adapters given to
      `load_lora_adapters`, or -1 for the base weights. None: no adapter anywhere.
    - `cos_cache`: RoPE cos table `[B, S, R/2]` or `[B, S, R]` to use as given.
    - `sin_cache`: RoPE sin table, like cos_cache.
    - `rmsnorm`: callable applied to hidden_states before the QKV projection (NxDI form:
      only with `neuron_config.qkv_kernel_enabled`, as NxDI's fused QKV kernel).
    - `rotary_position_ids`: positions for RoPE; default position_ids.
    - `kv_mgr`: a KVCacheManager or PagedKVCacheManager (blocks reserved for the new
      positions); layer `idx` is read (get_kv_per_layer) and written
      (update_kv_per_layer) for sequences `seq_ids`.
    - `residual`: `[B, S, hidden_size]` added to hidden_states first; the sum is returned
      (NxDI form without `qkv_kernel_enabled`: not added, returned unchanged).
    - `**kwargs`: `seq_ids` `[B]` cache rows (default 0..B-1), `idx` layer index; NxDI form
      also `use_polar_compatible_rope` (RoPE from rope_theta on this call); `step`: a
      model's `StepMetadata` (`distattn.step.builder.build_step`), trusted instead of
      the call's own inputs.

    It returns a NeuronAttentionBaseOutput: `present_key_value` is the layer's whole (K, V) cache
    when kv_mgr is written (a paged cache: its block pools), else the new tokens'
    (K, V) `[B, Hkv, S, D]`.

    Stages: context encoding when there is no prior KV or every row starts at
    position 0 (uses `learned_sinks`); otherwise token generation / multi-token
    generation over prior + new keys (uses `tkg_learned_sinks`).
    """

    def __init__(
        self,
        config: Any = None,
        *args: Any,
        rotary_emb: nn.Module | None = None,
        kernel: str = "auto",
        layer_idx: int | None = None,
        groups: ParallelGroups | None = None,
        gqa_strategy: GQAStrategy | str | None = None,
        cp_split: CPSplit = "head_tail",
        cp_ring: bool = False,
        sequence_parallel: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **nxdi_keywords: Any,
    ) -> None:
        layer: dict[str, Any] = dict(kernel=kernel, layer_idx=layer_idx, gqa_strategy=gqa_strategy, cp_split=cp_split, cp_ring=cp_ring,
                     sequence_parallel=sequence_parallel, device=device)
        if isinstance(config, AttentionConfig):
            if args or nxdi_keywords:
                extra = sorted(nxdi_keywords) or [f"{len(args)} positional arguments"]
                raise TypeError(
                    f"NeuronAttentionBase(AttentionConfig, ...) takes no {extra}: put layer settings in the AttentionConfig, "
                    "or pass an NxDI InferenceConfig to use NxDI's keywords"
                )
            super().__init__(config, rotary_emb=rotary_emb, groups=groups, dtype=dtype, **layer)
            self.nxdi: NxdiForm | None = None
            return
        if rotary_emb is not None:
            nxdi_keywords["rotary_emb"] = rotary_emb
        nx = nxdi_layer(config, args, nxdi_keywords, groups=groups, dtype=dtype)  # every NxDI argument checked first
        for module in (nx.q_layernorm, nx.k_layernorm, nx.rotary_emb):
            if isinstance(module, nn.Module):
                module.to(dtype=nx.dtype, device=device)
        super().__init__(nx.attn_config, rotary_emb=nx.rotary_emb, groups=nx.groups, dtype=nx.dtype, settings_tag=nx.form, **layer)
        self.nxdi = nx.form
        self.config = config  # NxDI form: the InferenceConfig the model passed
        self.neuron_config = config.neuron_config
        self.q_layernorm, self.k_layernorm = nx.q_layernorm, nx.k_layernorm
        self.qk_norm = CustomRMSNorm(eps=nx.attn_config.rms_norm_eps) if nx.form.use_qk_norm else None
        set_nxdi_attributes(self, nx.dtype)

    @classmethod
    def from_nxdi(cls, config: Any = None, **keywords: Any) -> NeuronAttentionBase:
        """NxDI's constructor without an InferenceConfig at hand: one process, fp32 by default.

        `from_nxdi(hidden_size=..., num_attention_heads=..., softmax_scale=..., dtype=..., groups=...)`
        is `NeuronAttentionBase(InferenceConfig(NeuronConfig(torch_dtype=float32)), **keywords)`.
        """
        if config is None:
            from ...models.config import InferenceConfig, NeuronConfig

            config = InferenceConfig(NeuronConfig(torch_dtype=torch.float32))
        return cls(config, **keywords)

    def extra_norms(self, q: torch.Tensor, k: torch.Tensor, *, after_rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """An NxDI layer's own norm modules: `q_layernorm` / `k_layernorm` before RoPE, `qk_norm` where
        `qk_norm_placement` puts it."""
        if self.nxdi is None:
            return q, k
        if not after_rope and self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if self.nxdi.use_qk_norm and self.nxdi.qk_norm_after_rope == after_rope and self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)
        return q, k

    def extra_norm_modules(self) -> list[tuple[str, nn.Module]]:
        """An NxDI layer's per-head norm modules with their HF names: q_layernorm <- q_norm, k_layernorm <- k_norm."""
        if self.nxdi is None or not isinstance(self.q_layernorm, nn.Module) or not isinstance(self.k_layernorm, nn.Module):
            return []
        return [("q_norm", self.q_layernorm), ("k_norm", self.k_layernorm)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        active_mask: torch.Tensor | None = None,
        adapter_ids: torch.Tensor | None = None,
        cos_cache: torch.Tensor | None = None,
        sin_cache: torch.Tensor | None = None,
        rmsnorm: Callable[[torch.Tensor], torch.Tensor] | None = None,
        rotary_position_ids: torch.Tensor | None = None,
        kv_mgr: Any = None,
        get_kv_per_layer: bool = True,
        update_kv_per_layer: bool = True,
        residual: torch.Tensor | None = None,
        windowed_context_encoding_window_idx: int = -1,
        **kwargs: Any,
    ) -> NeuronAttentionBaseOutput:
        """Attend the new tokens to themselves and to the prior KV (each argument: the class docstring).
        windowed_context_encoding_window_idx: NxDI's; -1 (none) only."""
        if windowed_context_encoding_window_idx != -1:
            raise ValueError(
                f"windowed_context_encoding_window_idx={windowed_context_encoding_window_idx!r}: windowed context encoding is not "
                "supported; encode the whole prompt in one call (or in chunks with position_ids over a kv_mgr)"
            )
        step: StepMetadata | None = kwargs.pop("step", None)
        use_rope, in_dtype = True, hidden_states.dtype if isinstance(hidden_states, torch.Tensor) else None
        if self.nxdi is not None:  # NxDI's meaning of the extras, rmsnorm, residual and dtype
            use_rope = nxdi_forward_options(self.nxdi, self.rotary_emb is not None, kwargs)
            if isinstance(hidden_states, torch.Tensor):
                hidden_states = hidden_states.to(self.o_proj.weight.dtype)
        call = CallArgs(hidden_states, attention_mask, position_ids, past_key_value, active_mask, adapter_ids, cos_cache, sin_cache,
                        rotary_position_ids, kv_mgr, residual, kwargs, get_kv_per_layer, use_rope)
        step = self.prepare_step_of(call) if step is None else self._trusted(step, call)
        # ---- all inputs checked: from here on state may change ----
        passthrough = None
        if self.nxdi is not None and not self.nxdi.fuse_norm:
            rmsnorm, passthrough, residual = None, residual, None  # the decoder layer norms and adds itself
        if residual is not None:
            hidden_states = hidden_states + residual
            residual = hidden_states
        x = rmsnorm(hidden_states) if rmsnorm is not None else hidden_states
        hidden, cos_cache, sin_cache, new_kv = run_attention(self, x, step, cos_cache, sin_cache, write=update_kv_per_layer)
        cache = step.cache
        present = (cache.k, cache.v) if cache is not None and update_kv_per_layer else new_kv
        if self.nxdi is not None:
            hidden = hidden.to(in_dtype)
            residual = passthrough if residual is None else residual
        return NeuronAttentionBaseOutput(hidden, present, cos_cache, sin_cache, residual)

    def prepare_step(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, **call: Any) -> StepMetadata:
        """Check a call of this layer's forward (its arguments by the same names) and describe it once:
        the `StepMetadata` every layer of a model may then be given as `step=`. Raises what forward raises."""
        extra: dict[str, Any] = {k: call.pop(k) for k in ("seq_ids", "idx") if k in call}
        return build_step(CallArgs(hidden_states, attention_mask, position_ids, extra=extra, **call), self.facts(), self.groups,
                          sequence_parallel=self.sequence_parallel)

    def prepare_step_of(self, call: CallArgs) -> StepMetadata:
        """The step of this layer called alone (the model's other layers already hold this call's tokens)."""
        return build_step(call, self.facts(), self.groups, sequence_parallel=self.sequence_parallel, this_layer_only=True)

    def _trusted(self, step: StepMetadata, call: CallArgs) -> StepMetadata:
        """A model's step, bound to this layer: the call must not pass its inputs a second time."""
        given = {"attention_mask": call.attention_mask, "position_ids": call.position_ids, "past_key_value": call.past_key_value,
                 "active_mask": call.active_mask, "adapter_ids": call.adapter_ids, "rotary_position_ids": call.rotary_position_ids,
                 "kv_mgr": call.kv_mgr}
        others = sorted(set(call.extra) - {"idx"})
        if any(v is not None for v in given.values()) or others:
            extra = sorted([n for n, v in given.items() if v is not None] + others)
            raise TypeError(f"forward(step=...) takes the call's inputs from the step; do not pass {extra} too")
        bound = bind_layer(step, call.extra.get("idx", self.layer_idx), self.attn_config, self.n_kv_heads, call.hidden_states)
        check_rope_tables(call.cos_cache, call.sin_cache, *bound.position_ids.shape)
        return bound
