"""NeuronAttentionBase: project -> norm -> RoPE -> KV cache -> kernel -> sinks -> o_proj."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import validation as check
from .config import AttentionConfig
from .kernels import AttentionSpec, select_backend
from .kv_cache import KVCacheManager
from .ops.merge import apply_sinks, merge_partials
from .ops.norms import rms_norm, temperature_scale
from .ops.rope import apply_rope, half_table, inv_freq_for, rope_cos_sin
from .output import NeuronAttentionBaseOutput
from .parallel import ColumnParallelLinear, GQAStrategy, HeadLayout, ParallelGroups, RowParallelLinear


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


class NeuronAttentionBase(nn.Module):
    """GQA attention for LLM inference with NxDI's forward signature.

    Args:
        config: the layer's AttentionConfig.
        rotary_emb: optional HF-style rotary module, called as `rotary_emb(x, position_ids)`
            and returning (cos, sin) `[B, S, R]` or `[B, S, R/2]`, or complex `[B, S, R/2]`
            (Llama 4). Without it the layer computes RoPE from `config.rope`.
        kernel: "auto" or a backend name from `distattn.kernels.available_backends()`.
        layer_idx: default `idx` for KV cache manager access.
        groups: process groups; heads are sharded over `groups.tp` (default: one process).
        gqa_strategy: how kv heads are sharded when tp exceeds or does not divide them
            (`GQAStrategy`; default REPLICATE_TO_TP_DEGREE, CONVERT_TO_MHA when needed).
        dtype, device: of the parameters.

    With tensor parallelism each rank holds `self.layout`'s heads: `n_heads` q heads and
    `n_kv_heads` kv heads (padding included), their projection rows, o_proj columns and
    sinks; o_proj all-reduces over the group and adds its bias once.
    """

    def __init__(
        self,
        config: AttentionConfig,
        *,
        rotary_emb: nn.Module | None = None,
        kernel: str = "auto",
        layer_idx: int | None = None,
        groups: ParallelGroups | None = None,
        gqa_strategy: GQAStrategy | str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"config must be a distattn.AttentionConfig, got {type(config).__name__}")
        self.config = config
        self.kernel = kernel
        self.layer_idx = layer_idx
        self.rotary_emb = rotary_emb
        self.groups = groups if groups is not None else ParallelGroups()
        self.layout = HeadLayout.from_config(config, self.groups.tp_size, self.groups.tp_rank, gqa_strategy)
        self.n_heads = self.layout.n_q  # local q heads (padding included)
        self.n_kv_heads = self.layout.n_kv  # local kv heads
        self.head_dim: int = config.head_dim  # type: ignore[assignment]
        kw = {"dtype": dtype, "device": device}
        tp, tp_group, dim = self.groups.tp_size, self.groups.tp, self.head_dim
        q_width, kv_width = tp * self.n_heads * dim, tp * self.n_kv_heads * dim  # global, padded/replicated
        proj_kw = dict(bias=config.qkv_bias, group=tp_group, **kw)
        if config.fused_qkv:
            self.qkv_proj = ColumnParallelLinear(config.hidden_size, q_width + 2 * kv_width, fused_qkv=True, **proj_kw)
        else:
            self.q_proj = ColumnParallelLinear(config.hidden_size, q_width, **proj_kw)
            self.k_proj = ColumnParallelLinear(config.hidden_size, kv_width, **proj_kw)
            self.v_proj = ColumnParallelLinear(config.hidden_size, kv_width, **proj_kw)
        self.o_proj = RowParallelLinear(q_width, config.hidden_size, bias=config.o_bias, group=tp_group, **kw)
        if config.qk_norm is not None:
            norm_kw = dict(weighted=config.qk_norm == "rmsnorm", weight_offset=config.qk_norm_weight_offset, **kw)
            self.q_norm = HeadNorm(self.head_dim, config.rms_norm_eps, **norm_kw)
            self.k_norm = HeadNorm(self.head_dim, config.rms_norm_eps, **norm_kw)
        if config.has_sinks:
            self.learned_sinks = nn.Parameter(torch.zeros(self.n_heads, **kw))  # prefill (CTE), local heads
            self.tkg_learned_sinks = nn.Parameter(torch.zeros(self.n_heads, **kw))  # decode (TKG)
        self._inv_freq: torch.Tensor | None = None
        self._rope_scale = 1.0
        if config.rope is not None:
            self._inv_freq, self._rope_scale = inv_freq_for(config.rope, config.rotary_dim)
        self.spec = AttentionSpec(config.scale, config.sliding_window, config.attention_chunk_size)

    @classmethod
    def from_nxdi(cls, *, softmax_scale: float | None = None, rotary_emb: nn.Module | None = None, **fields: Any) -> NeuronAttentionBase:
        """Build from NxDI constructor arguments.

        NxDI's `softmax_scale` divides q.k (default sqrt(head_dim)); ours multiplies,
        so it is converted once here. Other keyword arguments are AttentionConfig fields.
        """
        if softmax_scale is not None:
            fields["softmax_scale"] = 1.0 / softmax_scale
        return cls(AttentionConfig(**fields), rotary_emb=rotary_emb)

    @property
    def _param(self) -> torch.Tensor:
        return self.o_proj.weight

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
                visibility otherwise comes from positions (causal, window, chunk).
            position_ids: `[B, S]` positions of the new tokens; default 0..S-1 (prefill).
            past_key_value: prior (K, V) `[B, Hkv, L, D]`, slot j holding position j.
            active_mask: `[B, 1, S, S]` bool, further restriction among the new tokens.
            adapter_ids: multi-LoRA is not implemented; must be None.
            cos_cache, sin_cache: RoPE tables `[B, S, R/2]` or `[B, S, R]` to use as given.
            rmsnorm: callable applied to hidden_states before the QKV projection.
            rotary_position_ids: positions for RoPE; default position_ids.
            kv_mgr: a KVCacheManager; layer `idx` is read (get_kv_per_layer) and written
                (update_kv_per_layer) at rows `seq_ids`.
            residual: `[B, S, hidden_size]` added to hidden_states first; the sum is returned.
            **kwargs: `seq_ids` `[B]` cache rows (default 0..B-1), `idx` layer index.

        Returns:
            NeuronAttentionBaseOutput. `present_key_value` is the layer's whole (K, V) cache
            when kv_mgr is written, else the new tokens' (K, V) `[B, Hkv, S, D]`.

        Stages: context encoding when there is no prior KV or every row starts at
        position 0 (uses `learned_sinks`); otherwise token generation / multi-token
        generation over prior + new keys (uses `tkg_learned_sinks`).
        """
        cfg = self.config
        inputs = check.check_forward_inputs(
            cfg,
            hidden_states,
            param=self._param,
            n_kv_heads=self.n_kv_heads,
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
        )
        # ---- all inputs checked: from here on state may change ----
        if residual is not None:
            hidden_states = hidden_states + residual
            residual = hidden_states
        x = rmsnorm(hidden_states) if rmsnorm is not None else hidden_states
        q, k, v = self._project(x)  # [B, S, H, D] each
        q, k, cos_cache, sin_cache = self._encode_positions(q, k, inputs.position_ids, inputs.rotary_position_ids, cos_cache, sin_cache)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        out = self._attend(q, k, v, inputs, read_prior=get_kv_per_layer)  # [B, Hq, S, D]

        cache = inputs.cache
        if cache is not None and update_kv_per_layer:
            cache.write(inputs.seq_ids, k, v, inputs.position_ids, inputs.valid)
            present = (cache.k, cache.v)
        else:
            present = (k, v)
        batch, seq = inputs.position_ids.shape
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)  # [B, S, Hq_local * D]
        return NeuronAttentionBaseOutput(self.o_proj(out), present, cos_cache, sin_cache, residual)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: check.ForwardInputs, *, read_prior: bool) -> torch.Tensor:
        """q `[B, Hq, S, D]`, new k and v `[B, Hkv, S, D]` -> attention output `[B, Hq, S, D]`.

        The new tokens attend to themselves and, outside context encoding, to the prior
        keys (those before each row's first new position); the two partial results are
        merged by log-sum-exp and the stage's sinks applied once.
        """
        positions, valid = inputs.position_ids, inputs.valid
        batch, seq = positions.shape
        prior = inputs.past_key_value
        if prior is None and inputs.cache is not None and read_prior:
            prior = inputs.cache.read(inputs.seq_ids, batch)
        elif prior is not None:
            prior_k = prior[0]
            prior = (*prior, torch.arange(prior_k.shape[2], device=prior_k.device).expand(batch, -1))  # slot j = position j
        none = torch.iinfo(torch.long).max  # the start of a row that is all padding
        starts = torch.where(valid, positions, none).min(dim=1, keepdim=True).values  # [B, 1] first new position
        context_encoding = prior is None or bool(((starts == 0) | (starts == none)).all())

        queries = valid.view(batch, 1, seq, 1)  # padding queries see nothing
        mask = queries if inputs.active_mask is None else queries & inputs.active_mask
        new_keys = positions.masked_fill(~valid, -1)  # padding is never a key
        parts = [self._kernel_call(q, k, v, positions, new_keys, mask)]
        if not context_encoding:
            prior_k, prior_v, prior_pos = prior  # type: ignore[misc]
            prior_pos = prior_pos.masked_fill(prior_pos >= starts, -1)  # only keys before the new tokens
            parts.append(self._kernel_call(q, prior_k, prior_v, positions, prior_pos, queries))
        out, lse = merge_partials(parts)  # [B, Hq, S, D], [B, Hq, S]
        if self.config.has_sinks:
            out = apply_sinks(out, lse, self.learned_sinks if context_encoding else self.tkg_learned_sinks)
        return out

    def _kernel_call(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        backend = select_backend(self.kernel, q, k, self.spec)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        return backend.attend(q, k, v, q_pos=q_pos, k_pos=k_pos, spec=self.spec, mask=mask)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x `[B, S, hidden]` -> q `[B, S, Hq, D]`, k and v `[B, S, Hkv, D]` (clipped, normed pre-RoPE)."""
        cfg = self.config
        if cfg.fused_qkv:
            q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([q_width, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        batch, seq, _ = x.shape
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if cfg.qk_norm is not None and not cfg.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _encode_positions(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        rotary_positions: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """RoPE (or temperature tuning on NoPE layers) and post-RoPE QK-norm on `[B, S, H, D]`."""
        cfg = self.config
        if cfg.rope is not None:
            if cos is None:
                cos, sin = self._rope_tables(q, rotary_positions)
            rdim, interleaved = cfg.rotary_dim, cfg.rope.interleaved
            c, s = half_table(cos, rdim, interleaved), half_table(sin, rdim, interleaved)  # type: ignore[arg-type]
            q = apply_rope(q, c, s, rotary_dim=rdim, interleaved=interleaved)
            k = apply_rope(k, c, s, rotary_dim=rdim, interleaved=interleaved)
        if cfg.qk_norm is not None and cfg.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.attn_temperature_tuning:
            scale = temperature_scale(positions, cfg.floor_scale, cfg.attn_scale)  # [B, S]
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
        """Load an HF attention module's own state dict, keeping this rank's shard.

        Takes the full tensors (q_proj / k_proj / v_proj / o_proj weights and biases,
        `sinks`, q_norm / k_norm) and cuts out, replicates or zero-pads this rank's
        heads as `self.layout` says; `sinks` fill both learned_sinks and
        tkg_learned_sinks. Raises ValueError listing missing, unexpected or
        mis-shaped tensors before any parameter changes.
        """
        from .hf import hf_attention_shapes

        expected = hf_attention_shapes(self.config)
        missing = sorted(set(expected) - set(state_dict))
        extra = sorted(set(state_dict) - set(expected))
        bad = [
            f"{n}: {list(state_dict[n].shape)} vs {list(expected[n])}"
            for n in expected
            if n in state_dict and tuple(state_dict[n].shape) != expected[n]
        ]
        if missing or extra or bad:
            raise ValueError(f"state_dict does not fit this layer: missing {missing}, unexpected {extra}, mis-shaped {bad}")
        layout, dim, sd = self.layout, self.head_dim, state_dict
        bias = self.config.qkv_bias

        def rows(name: str, slots: tuple[int | None, ...]) -> torch.Tensor | None:
            return layout.shard_heads(sd[name], slots, dim) if name in sd else None

        q = (rows("q_proj.weight", layout.q_heads), rows("q_proj.bias", layout.q_heads) if bias else None)
        k = (rows("k_proj.weight", layout.kv_heads), rows("k_proj.bias", layout.kv_heads) if bias else None)
        v = (rows("v_proj.weight", layout.kv_heads), rows("v_proj.bias", layout.kv_heads) if bias else None)
        with torch.no_grad():
            if self.config.fused_qkv:
                self.qkv_proj.load_shard(torch.cat([q[0], k[0], v[0]]), torch.cat([q[1], k[1], v[1]]) if bias else None)
            else:
                self.q_proj.load_shard(*q)
                self.k_proj.load_shard(*k)
                self.v_proj.load_shard(*v)
            self.o_proj.load_shard(layout.shard_heads(sd["o_proj.weight"], layout.q_heads, dim, dim=1), sd.get("o_proj.bias"))
            if self.config.has_sinks:
                self.learned_sinks.copy_(layout.shard_per_head(sd["sinks"]))
                self.tkg_learned_sinks.copy_(layout.shard_per_head(sd["sinks"]))
            if self.config.qk_norm == "rmsnorm":
                self.q_norm.weight.copy_(sd["q_norm.weight"])  # type: ignore[union-attr]
                self.k_norm.weight.copy_(sd["k_norm.weight"])  # type: ignore[union-attr]
