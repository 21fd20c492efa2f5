"""NeuronAttentionBase: project -> norm -> RoPE -> KV cache -> kernel -> sinks -> o_proj."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import validation as check
from .config import AttentionConfig
from .kernels import AttentionSpec, select_backend
from .transaction import all_or_nothing
from .kv_cache import KVCacheManager
from .ops.merge import apply_sinks, merge_partials
from .ops.norms import rms_norm, temperature_scale
from .ops.rope import apply_rope, half_table, inv_freq_for, rope_cos_sin
from .output import NeuronAttentionBaseOutput
from .parallel import GQAStrategy, HeadLayout, ParallelGroups, comm, flows
from .parallel.sequence import CPSplit
from .lora import LoraWeights, check_lora_fits
from .nxdi.form import NxdiForm, nxdi_forward_options, set_nxdi_attributes
from .nxdi.layer import nxdi_layer
from .nxdi.modules.custom_calls import CustomRMSNorm
from .projections import HeadShard, build_projections, load_attention, load_lora, project


class HeadNorm(nn.Module):
    """QK-norm over head_dim: RMSNorm with a weight, or the weightless form."""

    def __init__(self, head_dim: int, eps: float, *, weighted: bool, weight_offset: float, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.full((head_dim,), 1.0 - weight_offset, dtype=dtype, device=device)) if weighted else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., head_dim]` -> same shape."""
        return rms_norm(x, self.weight, self.eps, self.weight_offset)


def stage_layouts(config: AttentionConfig, groups: ParallelGroups, strategy: GQAStrategy | str | None) -> tuple[HeadLayout, HeadLayout]:
    """(prefill, decode) head layouts of this rank.

    The unit is the full-TP layout of one rank. Under context parallelism a rank
    holds the units of its whole CP group during prefill; under data parallelism the
    units of its whole DP group during decode. Its own unit is always inside both.
    """
    def unit(rank: int) -> HeadLayout:
        return HeadLayout.from_config(config, groups.tp_size, rank, strategy)

    own = unit(groups.tp_rank)
    prefill = HeadLayout.concat([unit(r) for r in groups.tp_ranks_of(groups.cp)]) if groups.cp_size > 1 else own
    decode = HeadLayout.concat([unit(r) for r in groups.tp_ranks_of(groups.dp)]) if groups.dp_size > 1 else own
    return prefill, decode


class NeuronAttentionBase(nn.Module):
    """GQA attention for LLM inference with NxDI's forward signature.

    Two constructors:

    - `NeuronAttentionBase(AttentionConfig(...), groups=..., dtype=...)`, distattn's own.
    - NxDI's: `NeuronAttentionBase(config=inference_config, hidden_size=..., num_attention_heads=...,
      ...)` with an NxDI-style `InferenceConfig` (`distattn.nxdi.models.config`) and NxDI's
      keywords (`*args`: hidden_size, num_attention_heads, num_key_value_heads by position;
      `**nxdi_keywords`: the rest, see `distattn.nxdi.layer.KEYWORDS`). The parallel layout
      and dtype come from `config.neuron_config`; `self.config` is that InferenceConfig and
      the forward gives `rmsnorm`, `residual`, 4-D masks and `use_polar_compatible_rope`
      NxDI's meaning (`distattn.nxdi.form.NxdiForm`). `self.attn_config` is the layer's
      AttentionConfig in both forms.

    Args:
        config: the layer's AttentionConfig, or an NxDI InferenceConfig.
        rotary_emb: optional HF-style rotary module, called as `rotary_emb(x, position_ids)`
            and returning (cos, sin) `[B, S, R]` or `[B, S, R/2]`, or complex `[B, S, R/2]`
            (Llama 4). Without it the layer computes RoPE from `attn_config.rope`.
        kernel: "auto" or a backend name from `distattn.kernels.available_backends()`.
        layer_idx: default `idx` for KV cache manager access.
        groups: process groups (default: one process). Heads are sharded over `groups.tp`;
            with `groups.cp` prefill splits the prompt across ranks, with `groups.dp`
            decode splits the batch across replicas.
        gqa_strategy: how kv heads are sharded when tp exceeds or does not divide them
            (`GQAStrategy`; default REPLICATE_TO_TP_DEGREE, CONVERT_TO_MHA when needed).
        cp_split: how a context-parallel prefill splits the prompt: "head_tail" (default,
            balanced causal work), "strided" or "contiguous".
        cp_ring: context-parallel prefill passes K/V blocks around the CP group and merges
            partial results (memory ~ 1/cp) instead of all-gathering every block.
        sequence_parallel: context-parallel prefill takes and returns only this rank's rows
            (see `distattn.parallel.flows.split_prompt` / `gather_prompt`), so per-rank
            activations shrink as 1/cp; otherwise it takes and returns the whole prompt.
        dtype: of the parameters (default fp32; NxDI form: `neuron_config.torch_dtype`).
        device: of the parameters.

    Each rank holds the heads of `prefill_layout` (projections `q_proj`.. `o_proj`,
    `learned_sinks`) and of `layout` for decode (`tkg_proj` when it differs, and
    `tkg_learned_sinks`); the KV cache holds `layout`'s kv heads. o_proj all-reduces
    over the stage's attention-TP group and adds its bias once.
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
        super().__init__()
        self.nxdi: NxdiForm | None = None
        if isinstance(config, AttentionConfig):
            if args or nxdi_keywords:
                extra = sorted(nxdi_keywords) or [f"{len(args)} positional arguments"]
                raise TypeError(
                    f"NeuronAttentionBase(AttentionConfig, ...) takes no {extra}: put layer settings in the AttentionConfig, "
                    "or pass an NxDI InferenceConfig to use NxDI's keywords"
                )
            attn_config = config
        else:  # NxDI's form: an InferenceConfig plus NxDI's keywords
            if rotary_emb is not None:
                nxdi_keywords["rotary_emb"] = rotary_emb
            nx = nxdi_layer(config, args, nxdi_keywords, groups=groups, dtype=dtype)
            attn_config, groups, dtype, rotary_emb = nx.attn_config, nx.groups, nx.dtype, nx.rotary_emb
            self.nxdi = nx.form
            self.neuron_config = config.neuron_config
            for norm in (nx.q_layernorm, nx.k_layernorm, rotary_emb):
                if isinstance(norm, nn.Module):
                    norm.to(dtype=dtype, device=device)
            self.q_layernorm, self.k_layernorm = nx.q_layernorm, nx.k_layernorm
            self.qk_norm = CustomRMSNorm(eps=attn_config.rms_norm_eps) if nx.form.use_qk_norm else None
        dtype = torch.float32 if dtype is None else dtype
        self.config = config  # ours: the AttentionConfig; NxDI form: the InferenceConfig the model passed
        self.attn_config: AttentionConfig = attn_config  # what shapes this layer, in both forms
        self.kernel = kernel
        self.layer_idx = layer_idx
        self.rotary_emb = rotary_emb
        self.groups = groups if groups is not None else ParallelGroups()
        self.cp_split, self.cp_ring = flows.check_cp_split(cp_split), cp_ring
        self.sequence_parallel = sequence_parallel
        self.prefill_layout, self.layout = stage_layouts(attn_config, self.groups, gqa_strategy)
        self.n_kv_heads = self.layout.n_kv  # kv heads of this rank's KV cache
        self.head_dim: int = attn_config.head_dim  # type: ignore[assignment]
        kw = {"dtype": dtype, "device": device}
        prefill_group = self.groups.cp_tp if self.groups.cp_size > 1 else self.groups.tp
        decode_group = self.groups.dp_tp if self.groups.dp_size > 1 else self.groups.tp
        build_projections(self, attn_config, self.prefill_layout, prefill_group, **kw)
        self.tkg_proj = None if self.prefill_layout == self.layout else HeadShard(attn_config, self.layout, decode_group, **kw)
        if attn_config.qk_norm is not None:
            norm_kw = dict(weighted=attn_config.qk_norm == "rmsnorm", weight_offset=attn_config.qk_norm_weight_offset, **kw)
            self.q_norm = HeadNorm(self.head_dim, attn_config.rms_norm_eps, **norm_kw)
            self.k_norm = HeadNorm(self.head_dim, attn_config.rms_norm_eps, **norm_kw)
        if attn_config.has_sinks:
            self.learned_sinks = nn.Parameter(torch.zeros(self.prefill_layout.n_q, **kw))  # prefill (CTE) heads
            self.tkg_learned_sinks = nn.Parameter(torch.zeros(self.layout.n_q, **kw))  # decode (TKG) heads
        self._inv_freq: torch.Tensor | None = None
        self._rope_scale = 1.0
        if attn_config.rope is not None:
            self._inv_freq, self._rope_scale = inv_freq_for(attn_config.rope, attn_config.rotary_dim)
        self.spec = AttentionSpec(attn_config.scale, attn_config.sliding_window, attn_config.attention_chunk_size)
        self.adapter_names: tuple[str, ...] = ()  # loaded LoRA adapters; adapter_ids index them
        if self.nxdi is not None:
            set_nxdi_attributes(self, dtype)
        # every rank must build the same layer, or collectives would pair up wrongly later
        settings = (attn_config, self.nxdi, str(gqa_strategy), cp_split, cp_ring, sequence_parallel, dtype, self.groups.cp_size, self.groups.dp_size)
        comm.check_same(repr(settings), self.groups.tp, "NeuronAttentionBase settings")

    @classmethod
    def from_nxdi(cls, config: Any = None, **keywords: Any) -> NeuronAttentionBase:
        """NxDI's constructor without an InferenceConfig at hand: one process, fp32 by default.

        `from_nxdi(hidden_size=..., num_attention_heads=..., softmax_scale=..., dtype=..., groups=...)`
        is `NeuronAttentionBase(InferenceConfig(NeuronConfig(torch_dtype=float32)), **keywords)`.
        """
        if config is None:
            from .nxdi.models.config import InferenceConfig, NeuronConfig

            config = InferenceConfig(NeuronConfig(torch_dtype=torch.float32))
        return cls(config, **keywords)

    # ---- forward ---------------------------------------------------------------------------

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
        kv_mgr: KVCacheManager | None = None,
        get_kv_per_layer: bool = True,
        update_kv_per_layer: bool = True,
        residual: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> NeuronAttentionBaseOutput:
        """Attend the new tokens to themselves and to the prior KV.

        Args:
            hidden_states: `[B, S, hidden_size]` new tokens (before `rmsnorm`, if given).
            attention_mask: `[B, S]` padding mask of the new tokens (True/1 = real). Padding is
                neither attended to nor cached, and its attention output is zero. Key
                visibility otherwise comes from positions (causal, window, chunk). Or NxDI's
                4-D bool mask, a further restriction: `[B, 1, S, S]` over the new tokens in
                context encoding, `[B, 1, S, L]` over the prior cache's L slots in decode.
            position_ids: `[B, S]` positions of the new tokens; default 0..S-1 (prefill).
            past_key_value: prior (K, V) `[B, Hkv, L, D]`, slot j holding position j.
            active_mask: `[B, 1, S, S]` bool, further restriction among the new tokens.
            adapter_ids: `[B]` LoRA adapter of each row: an index into the adapters given to
                `load_lora_adapters`, or -1 for the base weights. None: no adapter anywhere.
            cos_cache: RoPE cos table `[B, S, R/2]` or `[B, S, R]` to use as given.
            sin_cache: RoPE sin table, like cos_cache.
            rmsnorm: callable applied to hidden_states before the QKV projection (NxDI form:
                only with `neuron_config.qkv_kernel_enabled`, as NxDI's fused QKV kernel).
            rotary_position_ids: positions for RoPE; default position_ids.
            kv_mgr: a KVCacheManager or PagedKVCacheManager (blocks reserved for the new
                positions); layer `idx` is read (get_kv_per_layer) and written
                (update_kv_per_layer) for sequences `seq_ids`.
            residual: `[B, S, hidden_size]` added to hidden_states first; the sum is returned
                (NxDI form without `qkv_kernel_enabled`: not added, returned unchanged).
            **kwargs: `seq_ids` `[B]` cache rows (default 0..B-1), `idx` layer index; NxDI form
                also `use_polar_compatible_rope` (RoPE from rope_theta on this call).

        Returns:
            NeuronAttentionBaseOutput. `present_key_value` is the layer's whole (K, V) cache
            when kv_mgr is written (a paged cache: its block pools), else the new tokens'
            (K, V) `[B, Hkv, S, D]`.

        Stages: context encoding when there is no prior KV or every row starts at
        position 0 (uses `learned_sinks`); otherwise token generation / multi-token
        generation over prior + new keys (uses `tkg_learned_sinks`).
        """
        step = kwargs.pop("step", None)
        use_rope, passthrough, in_dtype = True, None, getattr(hidden_states, "dtype", None)
        if self.nxdi is not None:  # NxDI's meaning of the extras, rmsnorm, residual and dtype
            use_rope = nxdi_forward_options(self.nxdi, self.rotary_emb is not None, kwargs)
            if isinstance(hidden_states, torch.Tensor):
                hidden_states = hidden_states.to(self.o_proj.weight.dtype)
        if step is None:  # called alone: check this call's arguments
            inputs = self.prepare_step(
                hidden_states, attention_mask, position_ids, past_key_value, active_mask, adapter_ids, cos_cache, sin_cache,
                rotary_position_ids, kv_mgr, get_kv_per_layer, residual, use_rope=use_rope, this_layer_only=True, **kwargs,
            )
        else:  # one step of a model: checked once by the model, trusted here
            given = {"attention_mask": attention_mask, "position_ids": position_ids, "past_key_value": past_key_value,
                     "active_mask": active_mask, "adapter_ids": adapter_ids, "rotary_position_ids": rotary_position_ids, "kv_mgr": kv_mgr}
            if any(v is not None for v in given.values()) or set(kwargs) - {"idx"}:
                extra = sorted([n for n, v in given.items() if v is not None] + sorted(set(kwargs) - {"idx"}))
                raise TypeError(f"forward(step=...) takes the call's inputs from the step; do not pass {extra} too")
            inputs = step.for_layer(step.kv_mgr, kwargs.get("idx", self.layer_idx), self.n_kv_heads, self.attn_config, hidden_states)
            check.check_rope_tables(cos_cache, sin_cache, *inputs.position_ids.shape)
        # ---- all inputs checked: from here on state may change ----
        if self.nxdi is not None and not self.nxdi.fuse_norm:
            rmsnorm, passthrough, residual = None, residual, None  # the decoder layer norms and adds itself
        if residual is not None:
            hidden_states = hidden_states + residual
            residual = hidden_states
        x = rmsnorm(hidden_states) if rmsnorm is not None else hidden_states
        if inputs.padded:  # padding's bytes (a NaN or Inf included) never reach a projection, a key or a value
            x = x.masked_fill(~inputs.valid.unsqueeze(-1), 0)
        write = inputs.cache is not None and update_kv_per_layer
        if inputs.context_encoding and self.groups.cp_size > 1:
            out, new_kv = flows.context_parallel_prefill(self, x, inputs, cos_cache, sin_cache, write=write)
        elif not inputs.context_encoding and self.groups.dp_size > 1:
            out, new_kv = flows.data_parallel_decode(self, x, inputs, cos_cache, sin_cache, write=write)
        else:
            out, new_kv = self._attend_here(x, inputs, cos_cache, sin_cache, write=write)
        hidden, cos_cache, sin_cache = out
        present = (inputs.cache.k, inputs.cache.v) if write else new_kv  # type: ignore[union-attr]
        if self.nxdi is not None:
            hidden = hidden.to(in_dtype)
            residual = passthrough if residual is None else residual
        return NeuronAttentionBaseOutput(hidden, present, cos_cache, sin_cache, residual)

    def prepare_step(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        active_mask: torch.Tensor | None = None,
        adapter_ids: torch.Tensor | None = None,
        cos_cache: torch.Tensor | None = None,
        sin_cache: torch.Tensor | None = None,
        rotary_position_ids: torch.Tensor | None = None,
        kv_mgr: KVCacheManager | None = None,
        get_kv_per_layer: bool = True,
        residual: torch.Tensor | None = None,
        *,
        use_rope: bool = True,
        this_layer_only: bool = False,
        **kwargs: Any,
    ) -> check.ForwardInputs:
        """Check one call's inputs (the forward's arguments) and describe the call once.

        Returns the step object (`distattn.validation.ForwardInputs`): positions, validity,
        cache rows, stage, where new tokens are written, whether the mask is plain causal.
        A model builds it with its first layer and passes `step=` to every layer's forward,
        which then only binds its own cache (`ForwardInputs.for_layer`): no check and no
        host synchronisation is repeated per layer. Raises exactly what forward raises.
        this_layer_only: the call is this layer alone (forward without `step`): of the manager's
        caches, check only this layer's (the model's earlier layers already hold this call's tokens).
        """
        inputs = check.check_forward_inputs(
            self.attn_config,
            hidden_states,
            param=self.o_proj.weight,
            n_kv_heads=self.n_kv_heads,
            read_prior=get_kv_per_layer,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            active_mask=active_mask,
            adapter_ids=adapter_ids,
            cos_cache=cos_cache,
            sin_cache=sin_cache,
            rotary_position_ids=rotary_position_ids,
            kv_mgr=kv_mgr,
            residual=residual,
            layer_idx=self.layer_idx,
            extra=kwargs,
            n_adapters=len(self.adapter_names),
            use_rope=use_rope,
        )
        if self.sequence_parallel and self.groups.cp_size > 1:
            inputs = flows.agree_on_stage(inputs, self.groups)  # rows are split: decide the stage together
        check.check_data_parallel_decode(inputs, self.groups.dp_size)
        # a model checks every rolling cache before any layer writes; a layer called alone only its own
        check.check_rolling_rewind(inputs, [inputs.cache] if this_layer_only else getattr(inputs.kv_mgr, "layers", []))
        inputs = check.resolve_key_mask(inputs)
        if inputs.cache is None or self.groups.cp_size > 1 or self.groups.dp_size > 1:
            return inputs  # the CP / DP flows write their own rows and positions, not the call's
        return inputs.plan_writes()

    # ---- the steps every flow shares ---------------------------------------------------------

    def stage_heads(self, context_encoding: bool) -> tuple[nn.Module, HeadLayout, torch.Tensor | None]:
        """(projection owner, head layout, sinks) of a stage."""
        sinks = None
        if self.attn_config.has_sinks:
            sinks = self.learned_sinks if context_encoding else self.tkg_learned_sinks
        if context_encoding or self.tkg_proj is None:
            return (self, self.prefill_layout if context_encoding else self.layout, sinks)
        return self.tkg_proj, self.layout, sinks

    def qkv(
        self,
        owner: nn.Module,
        layout: HeadLayout,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary_positions: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        adapter_ids: torch.Tensor | None = None,
        use_rope: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x `[B, S, hidden]` -> q `[B, Hq, S, D]`, k, v `[B, Hkv, S, D]` (normed, rotated), cos, sin.

        adapter_ids `[B]`: each row's LoRA adapter (-1: none); use_rope=False skips RoPE
        (an NxDI-form layer called without use_polar_compatible_rope)."""
        q, k, v = project(owner, self.attn_config, layout, x, adapter_ids)  # [B, S, H, D]
        q, k = self._norm_heads(q, k, after_rope=False)
        q, k, cos, sin = self._encode_positions(q, k, positions, rotary_positions, cos, sin, use_rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cos, sin

    def _norm_heads(self, q: torch.Tensor, k: torch.Tensor, *, after_rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """QK-norm of one placement on `[B, S, H, D]`: the config's, or an NxDI layer's modules
        (`q_layernorm` / `k_layernorm` before RoPE, `qk_norm` where `qk_norm_placement` puts it)."""
        cfg = self.attn_config
        if cfg.qk_norm is not None and cfg.qk_norm_after_rope == after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.nxdi is not None:
            if not after_rope and self.q_layernorm is not None:
                q, k = self.q_layernorm(q), self.k_layernorm(k)
            if self.nxdi.use_qk_norm and self.nxdi.qk_norm_after_rope == after_rope and self.qk_norm is not None:
                q, k = self.qk_norm(q), self.qk_norm(k)
        return q, k

    def attend(
        self,
        q: torch.Tensor,
        keys: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        q_pos: torch.Tensor,
        sinks: torch.Tensor | None,
        plain_causal: bool | None = None,
    ) -> torch.Tensor:
        """Attention of q `[B, Hq, S, D]` at q_pos `[B, S]` over key blocks, merged, sinks applied once.

        Each block is (k, v `[B, Hkv, Sk, D]`, k_pos `[B, Sk]` (-1: invalid), mask `[B, 1, S, Sk]` bool).
        plain_causal: whether the first block's mask is exactly causal over the queries' own positions
        (None: unknown, the kernel looks); the other blocks are never.
        """
        if len(keys) == 1:  # one block: a backend may apply the sinks itself (no log-sum-exp needed)
            k, v, k_pos, mask = keys[0]
            backend = select_backend(self.kernel, q, k, self.spec, need_lse=False)
            if getattr(backend, "fuses_sinks", False):
                return backend.attend(q, k.to(q.dtype), v.to(q.dtype), q_pos=q_pos, k_pos=k_pos, spec=self.spec, mask=mask, sinks=sinks)[0]
        hints = [plain_causal] + [False] * (len(keys) - 1)
        parts = [self._kernel_call(q, k, v, q_pos, k_pos, mask, hint) for (k, v, k_pos, mask), hint in zip(keys, hints)]
        out, lse = merge_partials(parts)  # [B, Hq, S, D], [B, Hq, S]
        return out if sinks is None else apply_sinks(out, lse, sinks)

    def output(self, owner: nn.Module, out: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Hq, S, D] -> o_proj (with each row's LoRA adapter; all-reduced over the stage's group) -> [B, S, hidden]."""
        batch, heads, seq, dim = out.shape
        return owner.o_proj(out.transpose(1, 2).reshape(batch, seq, heads * dim), adapter_ids)

    def _attend_here(
        self, x: torch.Tensor, inputs: check.ForwardInputs, cos: torch.Tensor | None, sin: torch.Tensor | None, *, write: bool
    ) -> tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
        """Every row and every local head on this rank (one process, or plain tensor parallel)."""
        positions, valid = inputs.position_ids, inputs.valid
        batch, seq = positions.shape
        owner, layout, sinks = self.stage_heads(inputs.context_encoding)
        adapters = inputs.adapter_ids
        if cos is None and self.attn_config.rope is not None and inputs.use_rope:
            cos, sin = inputs.rope_tables(self, x)  # once per call for layers that share the RoPE settings
        q, k, v, cos, sin = self.qkv(owner, layout, x, positions, inputs.rotary_position_ids, cos, sin, adapters, inputs.use_rope)
        queries = valid.view(batch, 1, seq, 1)  # padding queries see nothing
        cache = inputs.cache
        fast = inputs.active_mask is None and inputs.prior_mask is None
        if write and not inputs.context_encoding and fast and seq <= cache.max_new_tokens:  # type: ignore[union-attr]
            # decode: store the new tokens first, then one kernel call reads the cache in place
            # (the cache keeps room for them: nothing a query still needs is overwritten)
            select_backend(self.kernel, q, cache.k, self.spec)  # a refused kernel raises before the write  # type: ignore[union-attr]
            cache.write(inputs.seq_ids, k, v, positions, valid, inputs.write_plan(cache))  # type: ignore[union-attr]
            cached_k, cached_v, cached_pos = cache.read(inputs.seq_ids, batch, inputs.read_rows)  # type: ignore[union-attr]
            hidden = self.output(owner, self.attend(q, [(cached_k, cached_v, cached_pos, queries)], positions, sinks, False), adapters)
            return (hidden, cos, sin), (k, v)
        mask = queries if inputs.active_mask is None else queries & inputs.active_mask
        own_k, own_v = (k, v) if inputs.context_encoding or cache is None else cache.round_trip(k, v)  # decode reads keys as stored
        blocks = [(own_k, own_v, positions.masked_fill(~valid, -1), mask)]  # padding is never a key
        if not inputs.context_encoding:
            prior_k, prior_v, prior_pos = flows.prior_keys(inputs, inputs.seq_ids, positions, valid)
            blocks.append((prior_k, prior_v, prior_pos, queries if inputs.prior_mask is None else queries & inputs.prior_mask))
        # the new tokens' own block comes first: whether it is plain causal is known once per call
        hidden = self.output(owner, self.attend(q, blocks, positions, sinks, inputs.plain_causal), adapters)
        if write:
            # here prefill heads are this rank's full-TP unit (no CP) and decode heads the cache's (no DP)
            flows.write_cache(self, inputs, k, v, positions, valid, unit=inputs.context_encoding)
        return (hidden, cos, sin), (k, v)

    def _kernel_call(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, mask: torch.Tensor,
        plain_causal: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        backend = select_backend(self.kernel, q, k, self.spec)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        hint = {"plain_causal": plain_causal} if getattr(backend, "takes_plain_causal", False) else {}
        return backend.attend(q, k, v, q_pos=q_pos, k_pos=k_pos, spec=self.spec, mask=mask, **hint)

    def _encode_positions(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        rotary_positions: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        use_rope: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """RoPE (or temperature tuning on NoPE layers) and post-RoPE QK-norm on `[B, S, H, D]`."""
        cfg = self.attn_config
        if cfg.rope is not None and use_rope:
            if cos is None:
                cos, sin = self._rope_tables(q, rotary_positions)
            rdim, interleaved = cfg.rotary_dim, cfg.rope.interleaved
            c, s = half_table(cos, rdim, interleaved), half_table(sin, rdim, interleaved)  # type: ignore[arg-type]
            q = apply_rope(q, c, s, rotary_dim=rdim, interleaved=interleaved)
            k = apply_rope(k, c, s, rotary_dim=rdim, interleaved=interleaved)
        q, k = self._norm_heads(q, k, after_rope=True)
        if cfg.attn_temperature_tuning:
            scale = temperature_scale(positions, cfg.floor_scale, cfg.attn_scale, torch.promote_types(q.dtype, torch.float32))  # [B, S]
            q = (q * scale[:, :, None, None]).to(q.dtype)
        return q, k, cos, sin

    def _rope_tables(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` from the rotary module, or from config.rope."""
        if self.rotary_emb is not None:
            tables = self.rotary_emb(x, positions)
            if isinstance(tables, torch.Tensor) and torch.is_complex(tables):  # Llama 4: e^{i theta}
                return tables.real, tables.imag
            return tables
        acc = torch.promote_types(x.dtype, torch.float32)
        return rope_cos_sin(self._inv_freq, positions, self._rope_scale, acc)  # type: ignore[arg-type]

    # ---- weights ---------------------------------------------------------------------------

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load an HF attention module's own state dict, keeping this rank's shards.

        Takes the full tensors (q_proj / k_proj / v_proj / o_proj weights and biases,
        `sinks`, q_norm / k_norm) and cuts out, replicates or zero-pads this rank's
        heads for each stage as its layout says; `sinks` fill both learned_sinks and
        tkg_learned_sinks. Raises ValueError listing missing, unexpected or
        mis-shaped tensors before any parameter changes.
        """
        from .hf import StateDictSource

        self.load_hf(StateDictSource(state_dict))

    def load_hf(self, source: Any) -> None:
        """As load_hf_state_dict, from a `distattn.hf.StateDictSource` or `CheckpointSource`
        (which reads only this rank's heads from disk)."""
        load_attention(self, source)

    def load_lora_adapters(self, adapters: Sequence[LoraWeights]) -> None:
        """Load LoRA adapters on q/k/v/o (replacing any loaded before); adapter_ids index this list.

        Each `LoraWeights` holds one adapter's `{proj}.lora_A.weight` `[r, in]` and
        `{proj}.lora_B.weight` `[out, r]` (HF shapes, any subset of q/k/v/o_proj) and its
        scale (`distattn.lora.LoraAdapter.layer(i)` reads them from a PEFT directory).
        This rank keeps the slices its heads need for each stage. An empty list removes
        every adapter. Raises ValueError naming the adapter and tensor before anything changes.
        """
        from .hf import hf_attention_shapes

        for adapter in adapters:
            check_lora_fits(adapter, hf_attention_shapes(self.attn_config))
        with all_or_nothing(self, values=False):  # LoRA tensors are assigned, never written in place
            load_lora(self, self.attn_config, self.prefill_layout, adapters)
            if self.tkg_proj is not None:
                load_lora(self.tkg_proj, self.attn_config, self.layout, adapters)
            self.adapter_names = tuple(a.name for a in adapters)
