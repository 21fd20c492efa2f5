"""The attention layer: project -> QK-norm -> RoPE -> KV cache -> kernel -> sinks -> o_proj, given a step.

`AttentionLayer` holds one rank's heads (prefill and decode layouts, see `stage_layouts`),
their projections, QK-norm, sinks and RoPE settings, and offers the steps every parallel
plan shares (`stage_heads`, `qkv`, `attend`, `attend_block`, `output`) plus the
one-process path (`attend_here`). It knows nothing of NxDI's calling convention
(`distattn.nxdi` adapts it) and has no context- or data-parallel branch: those plans live in
`distattn.parallel.plans`, which calls the steps above. Every call's facts come from a
`StepMetadata` built once per model call (`distattn.step`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import arguments as args
from ..cache.store import KVStore
from ..config import AttentionConfig
from ..kernels import AttentionSpec, Backend, select_backend
from ..ops.masks import first_positions
from ..ops.merge import apply_sinks, merge_partials
from ..ops.norms import rms_norm, temperature_scale
from ..ops.rope import apply_rope, half_table, inv_freq_for, rope_cos_sin
from ..parallel.comm import check_same
from ..parallel.groups import ParallelGroups
from ..parallel.layout import GQAStrategy, HeadLayout
from ..parallel.sequence import CPSplit, check_cp_split
from ..step.builder import LayerFacts
from ..step.metadata import RopeTables, StepMetadata
from ..transaction import all_or_nothing
from .lora import LoraWeights, check_lora_fits
from .projections import HeadShard, Projections, build_projections, cut_heads, load_lora, load_projections, project

KeyBlock = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # k, v [B, Hkv, Sk, D], k_pos [B, Sk], mask [B, 1, S, Sk]
LayerResult = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]  # hidden, cos, sin, new (K, V)


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


class AttentionLayer(Projections):
    """GQA attention of one rank, built from an `AttentionConfig`.

    Args:
        config: the layer's AttentionConfig.
        rotary_emb: optional HF-style rotary module, called as `rotary_emb(x, position_ids)`
            and returning (cos, sin) `[B, S, R]` or `[B, S, R/2]`, or complex `[B, S, R/2]`
            (Llama 4). Without it the layer computes RoPE from `config.rope`.
        kernel: "auto" or a backend name from `distattn.kernels.available_backends()`.
        layer_idx: default `idx` for KV cache manager access.
        groups: process groups (default: one process). Heads are sharded over `groups.tp`;
            with `groups.cp` prefill splits the prompt across ranks, with `groups.dp`
            decode splits the batch across replicas (`distattn.parallel.plans`).
        gqa_strategy: how kv heads are sharded when tp exceeds or does not divide them
            (`GQAStrategy`; default REPLICATE_TO_TP_DEGREE, CONVERT_TO_MHA when needed).
        cp_split: how a context-parallel prefill splits the prompt: "head_tail" (default,
            balanced causal work), "strided" or "contiguous".
        cp_ring: context-parallel prefill passes K/V blocks around the CP group and merges
            partial results (memory ~ 1/cp) instead of all-gathering every block.
        sequence_parallel: context-parallel prefill takes and returns only this rank's rows
            (see `distattn.parallel.plans.split_prompt` / `gather_prompt`), so per-rank
            activations shrink as 1/cp; otherwise it takes and returns the whole prompt.
        dtype: of the parameters (default fp32).
        device: of the parameters.
        settings_tag: further settings every rank must share (an adapter's own), checked with the rest.

    Each rank holds the heads of `prefill_layout` (projections `q_proj`.. `o_proj`,
    `learned_sinks`) and of `layout` for decode (`tkg_proj` when it differs, and
    `tkg_learned_sinks`); the KV cache holds `layout`'s kv heads. o_proj all-reduces
    over the stage's attention-TP group and adds its bias once.
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
        cp_split: CPSplit = "head_tail",
        cp_ring: bool = False,
        sequence_parallel: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        settings_tag: Hashable = None,
    ) -> None:
        super().__init__()
        dtype = torch.float32 if dtype is None else args.float_dtype("dtype", dtype)
        self.config: Any = config  # an adapter may put its own config object here; attn_config is always the layer's
        self.attn_config: AttentionConfig = config  # what shapes this layer
        self.kernel, self.layer_idx, self.rotary_emb = kernel, layer_idx, rotary_emb
        self.groups = groups if groups is not None else ParallelGroups()
        self.cp_split, self.cp_ring = check_cp_split(cp_split), cp_ring
        self.sequence_parallel = sequence_parallel
        self.prefill_layout, self.layout = stage_layouts(config, self.groups, gqa_strategy)
        self.n_kv_heads = self.layout.n_kv  # kv heads of this rank's KV cache
        self.head_dim: int = config.head_dim
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        build_projections(self, config, self.prefill_layout, self.groups.cp_tp if self.groups.cp_size > 1 else self.groups.tp, **kw)
        decode_group = self.groups.dp_tp if self.groups.dp_size > 1 else self.groups.tp
        self.tkg_proj = None if self.prefill_layout == self.layout else HeadShard(config, self.layout, decode_group, **kw)
        self._build_norms_and_sinks(config, kw)
        self._inv_freq: torch.Tensor | None = None
        self._rope_scale = 1.0
        if config.rope is not None:
            self._inv_freq, self._rope_scale = inv_freq_for(config.rope, config.rotary_dim)
        self.spec = AttentionSpec(config.scale, config.sliding_window, config.attention_chunk_size)
        self.adapter_names: tuple[str, ...] = ()  # loaded LoRA adapters; adapter_ids index them
        # every rank must build the same layer, or collectives would pair up wrongly later
        settings = (config, settings_tag, str(gqa_strategy), cp_split, cp_ring, sequence_parallel, dtype, self.groups.cp_size, self.groups.dp_size)
        check_same(repr(settings), self.groups.tp, "NeuronAttentionBase settings")

    def _build_norms_and_sinks(self, config: AttentionConfig, kw: dict[str, Any]) -> None:
        """QK-norm modules (`q_norm`, `k_norm`) and learned sinks of both stages, as the config says."""
        if config.qk_norm is not None:
            weighted, offset = config.qk_norm == "rmsnorm", config.qk_norm_weight_offset
            self.q_norm = HeadNorm(self.head_dim, config.rms_norm_eps, weighted=weighted, weight_offset=offset, **kw)
            self.k_norm = HeadNorm(self.head_dim, config.rms_norm_eps, weighted=weighted, weight_offset=offset, **kw)
        if config.has_sinks:
            self.learned_sinks = nn.Parameter(torch.zeros(self.prefill_layout.n_q, **kw))  # prefill (CTE) heads
            self.tkg_learned_sinks = nn.Parameter(torch.zeros(self.layout.n_q, **kw))  # decode (TKG) heads

    def facts(self) -> LayerFacts:
        """What checking a call phrased for this layer needs (`distattn.step.builder`)."""
        weight = self.o_proj.weight
        return LayerFacts(self.attn_config, weight.dtype, weight.device, self.n_kv_heads, len(self.adapter_names), self.layer_idx)

    # ---- the steps every flow shares ---------------------------------------------------------

    def stage_heads(self, context_encoding: bool) -> tuple[Any, HeadLayout, torch.Tensor | None]:
        """(projection owner, head layout, sinks) of a stage."""
        sinks = None
        if self.attn_config.has_sinks:
            sinks = self.learned_sinks if context_encoding else self.tkg_learned_sinks
        if context_encoding or self.tkg_proj is None:
            return (self, self.prefill_layout if context_encoding else self.layout, sinks)
        return self.tkg_proj, self.layout, sinks

    def qkv(
        self,
        owner: Any,
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
        q, k = self.norm_heads(q, k, after_rope=False)
        q, k, cos, sin = self.encode_positions(q, k, positions, rotary_positions, cos, sin, use_rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cos, sin

    def norm_heads(self, q: torch.Tensor, k: torch.Tensor, *, after_rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """QK-norm of one placement on `[B, S, H, D]`: the config's, then any a subclass adds (`extra_norms`)."""
        cfg = self.attn_config
        if cfg.qk_norm is not None and cfg.qk_norm_after_rope == after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.extra_norms(q, k, after_rope=after_rope)

    def extra_norms(self, q: torch.Tensor, k: torch.Tensor, *, after_rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Norm modules beyond the config's (none here; the NxDI adapter applies its layer's own)."""
        return q, k

    def extra_norm_modules(self) -> list[tuple[str, nn.Module]]:
        """Norm modules beyond the config's, with their HF checkpoint names (loaded with the projections)."""
        return []

    def attend(
        self,
        q: torch.Tensor,
        keys: list[KeyBlock],
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
            if backend.fuses_sinks:
                return backend.attend(q, k.to(q.dtype), v.to(q.dtype), q_pos=q_pos, k_pos=k_pos, spec=self.spec, mask=mask, sinks=sinks)[0]
        hints = [plain_causal] + [False] * (len(keys) - 1)
        parts = [self.attend_block(q, k, v, q_pos, k_pos, mask, hint) for (k, v, k_pos, mask), hint in zip(keys, hints)]
        out, lse = merge_partials(parts)  # [B, Hq, S, D], [B, Hq, S]
        return out if sinks is None else apply_sinks(out, lse, sinks)

    def output(self, owner: Any, out: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Hq, S, D] -> o_proj (with each row's LoRA adapter; all-reduced over the stage's group) -> [B, S, hidden]."""
        batch, heads, seq, dim = out.shape
        return owner.o_proj(out.transpose(1, 2).reshape(batch, seq, heads * dim), adapter_ids)

    def attend_here(
        self, x: torch.Tensor, step: StepMetadata, cos: torch.Tensor | None, sin: torch.Tensor | None, *, write: bool
    ) -> LayerResult:
        """Every row and every local head on this rank (one process, or plain tensor parallel): x `[B, S, hidden]`
        -> (hidden `[B, S, hidden]`, cos, sin, the new tokens' (K, V) `[B, Hkv, S, D]`)."""
        positions, valid = step.position_ids, step.valid
        batch, seq = positions.shape
        owner, layout, sinks = self.stage_heads(step.context_encoding)
        if cos is None and self.attn_config.rope is not None and step.use_rope:
            cos, sin = self.step_rope_tables(step, x)  # once per call for layers that share the RoPE settings
        q, k, v, cos, sin = self.qkv(owner, layout, x, positions, step.rotary_position_ids, cos, sin, step.adapter_ids, step.use_rope)
        queries = valid.view(batch, 1, seq, 1)  # padding queries see nothing
        cache = step.cache
        if write and cache is not None and not step.context_encoding and step.active_mask is None and step.prior_mask is None \
                and seq <= cache.max_new_tokens:
            return (self._decode_in_place(owner, q, k, v, step, cache, sinks, queries), cos, sin, (k, v))
        mask = queries if step.active_mask is None else queries & step.active_mask
        own_k, own_v = (k, v) if step.context_encoding or cache is None else cache.round_trip(k, v)  # decode reads keys as stored
        blocks = [(own_k, own_v, positions.masked_fill(~valid, -1), mask)]  # padding is never a key
        if not step.context_encoding:
            prior_k, prior_v, prior_pos = prior_keys(step, step.seq_ids, positions, valid)
            blocks.append((prior_k, prior_v, prior_pos, queries if step.prior_mask is None else queries & step.prior_mask))
        # the new tokens' own block comes first: whether it is plain causal is known once per call
        hidden = self.output(owner, self.attend(q, blocks, positions, sinks, step.plain_causal), step.adapter_ids)
        if write and cache is not None:  # prefill heads are this rank's full-TP unit (no CP), decode heads the cache's (no DP)
            cache.write(step.seq_ids, k, v, positions, valid, step.write_plan(cache))
        return hidden, cos, sin, (k, v)

    def _decode_in_place(
        self, owner: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepMetadata, cache: KVStore,
        sinks: torch.Tensor | None, queries: torch.Tensor,
    ) -> torch.Tensor:
        """Decode: store the new tokens first, then one kernel call reads the cache in place (the cache keeps
        room for them: nothing a query still needs is overwritten)."""
        select_backend(self.kernel, q, cache.k, self.spec)  # a refused kernel raises before the write
        cache.write(step.seq_ids, k, v, step.position_ids, step.valid, step.write_plan(cache))
        cached_k, cached_v, cached_pos = cache.read(step.seq_ids, q.shape[0], step.read_rows)
        out = self.attend(q, [(cached_k, cached_v, cached_pos, queries)], step.position_ids, sinks, False)
        return self.output(owner, out, step.adapter_ids)

    def attend_block(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, mask: torch.Tensor,
        plain_causal: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One key block through the kernel, without sinks: (out `[B, Hq, S, D]`, lse `[B, Hq, S]`)."""
        backend: Backend = select_backend(self.kernel, q, k, self.spec)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        if backend.takes_plain_causal:
            out, lse = backend.attend(q, k, v, q_pos=q_pos, k_pos=k_pos, spec=self.spec, mask=mask, plain_causal=plain_causal)
        else:
            out, lse = backend.attend(q, k, v, q_pos=q_pos, k_pos=k_pos, spec=self.spec, mask=mask)
        assert lse is not None  # select_backend refuses backends without a log-sum-exp here
        return out, lse

    def encode_positions(
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
            if cos is None or sin is None:
                cos, sin = self.rope_tables(q, rotary_positions)
            rdim, interleaved = cfg.rotary_dim, cfg.rope.interleaved
            c, s = half_table(cos, rdim, interleaved), half_table(sin, rdim, interleaved)
            q = apply_rope(q, c, s, rotary_dim=rdim, interleaved=interleaved)
            k = apply_rope(k, c, s, rotary_dim=rdim, interleaved=interleaved)
        q, k = self.norm_heads(q, k, after_rope=True)
        if cfg.attn_temperature_tuning:
            scale = temperature_scale(positions, cfg.floor_scale, cfg.attn_scale, torch.promote_types(q.dtype, torch.float32))  # [B, S]
            q = (q * scale[:, :, None, None]).to(q.dtype)
        return q, k, cos, sin

    def rope_tables(self, x: torch.Tensor, positions: torch.Tensor) -> RopeTables:
        """cos, sin for `positions` `[B, S]` from the rotary module, or from config.rope."""
        if self.rotary_emb is not None:
            tables = self.rotary_emb(x, positions)
            if isinstance(tables, torch.Tensor) and torch.is_complex(tables):  # Llama 4: e^{i theta}
                return tables.real, tables.imag
            return tables[0], tables[1]
        assert self._inv_freq is not None  # config.rope is set (callers check)
        if self._inv_freq.device != positions.device:  # once per device (fp64 kept: never cast with the parameters)
            self._inv_freq = self._inv_freq.to(positions.device)
        return rope_cos_sin(self._inv_freq, positions, self._rope_scale, torch.promote_types(x.dtype, torch.float32))

    def step_rope_tables(self, step: StepMetadata, x: torch.Tensor) -> RopeTables:
        """The call's RoPE tables for this layer's settings, computed once per call for every layer that shares them."""
        cfg = self.attn_config
        key = (cfg.rope, cfg.rotary_dim, x.dtype, x.device, self.rotary_emb)
        return step.rope_tables(key, lambda positions: self.rope_tables(x, positions))

    # ---- weights ---------------------------------------------------------------------------

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load an HF attention module's own state dict, keeping this rank's shards.

        Takes the full tensors (q_proj / k_proj / v_proj / o_proj weights and biases,
        `sinks`, q_norm / k_norm) and cuts out, replicates or zero-pads this rank's
        heads for each stage as its layout says; `sinks` fill both learned_sinks and
        tkg_learned_sinks. Raises ValueError listing missing, unexpected or
        mis-shaped tensors before any parameter changes.
        """
        from ..hf import StateDictSource

        self.load_hf(StateDictSource(state_dict))

    @torch.no_grad()
    def load_hf(self, source: Any) -> None:
        """As load_hf_state_dict, from a `distattn.hf.StateDictSource` or `CheckpointSource` (which reads only
        this rank's heads from disk): every tensor's name and shape checked, then this rank's shards loaded.
        ValueError listing missing, unexpected or mis-shaped tensors before any parameter changes."""
        from ..hf import check_float_tensors, hf_attention_shapes, int8_scale_name

        config = self.attn_config
        expected = dict(hf_attention_shapes(config))
        expected.update({f"{hf}.{n}": tuple(p.shape) for hf, m in self.extra_norm_modules() for n, p in m.named_parameters()})
        shapes = source.shapes()
        prequantized = set(source.int8_weights())  # int8 codes; the source reads them times their scales
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected) - {int8_scale_name(n) for n in prequantized})
        bad = [f"{n}: {list(shapes[n])} vs {list(expected[n])}" for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
        if missing or extra or bad:
            raise ValueError(f"state_dict does not fit this layer: missing {missing}, unexpected {extra}, mis-shaped {bad}")
        check_float_tensors(source, [n for n in expected if n not in prequantized], "state_dict")
        with all_or_nothing(self):  # a read that fails half-way leaves every parameter as it was
            self._load_checked(source, set(shapes))

    def _load_checked(self, source: Any, names: set[str]) -> None:
        config = self.attn_config
        load_projections(self, config, self.prefill_layout, source, names)
        if self.tkg_proj is not None:
            load_projections(self.tkg_proj, config, self.layout, source, names)
        if config.has_sinks:
            self.learned_sinks.copy_(cut_heads(source, "sinks", self.prefill_layout.q_heads, 1))
            self.tkg_learned_sinks.copy_(cut_heads(source, "sinks", self.layout.q_heads, 1))
        if config.qk_norm == "rmsnorm":  # weighted norms
            for norm, name in ((self.q_norm, "q_norm.weight"), (self.k_norm, "k_norm.weight")):
                assert norm.weight is not None
                norm.weight.copy_(source.read(name))
        for hf_name, extra in self.extra_norm_modules():
            for name, param in extra.named_parameters():
                param.copy_(source.read(f"{hf_name}.{name}"))

    def load_lora_adapters(self, adapters: Sequence[LoraWeights]) -> None:
        """Load LoRA adapters on q/k/v/o (replacing any loaded before); adapter_ids index this list.

        Each `LoraWeights` holds one adapter's `{proj}.lora_A.weight` `[r, in]` and
        `{proj}.lora_B.weight` `[out, r]` (HF shapes, any subset of q/k/v/o_proj) and its
        scale (`distattn.lora.LoraAdapter.layer(i)` reads them from a PEFT directory).
        This rank keeps the slices its heads need for each stage. An empty list removes
        every adapter. Raises ValueError naming the adapter and tensor before anything changes.
        """
        from ..hf import hf_attention_shapes

        for adapter in adapters:
            check_lora_fits(adapter, hf_attention_shapes(self.attn_config))
        with all_or_nothing(self, values=False):  # LoRA tensors are assigned, never written in place
            load_lora(self, self.attn_config, self.prefill_layout, adapters)
            if self.tkg_proj is not None:
                load_lora(self.tkg_proj, self.attn_config, self.layout, adapters)
            self.adapter_names = tuple(a.name for a in adapters)


def prior_keys(
    step: StepMetadata, rows: torch.Tensor | None, positions: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prior K, V `[B, Hkv, L, D]` and key positions `[B, L]` (-1 unless before the row's new tokens)."""
    batch = positions.shape[0]
    first = first_positions(positions, valid).unsqueeze(1)  # [B, 1]
    if step.past_key_value is None:
        assert step.cache is not None  # token generation reads past_key_value or a cache
        known = step.read_rows if rows is step.seq_ids else None  # found once per call
        k, v, pos = step.cache.read(rows, batch, known)  # (a cache keeps unwritten slots zero)
        return k, v, pos.masked_fill(pos >= first, -1)
    k, v = step.past_key_value
    pos = torch.arange(k.shape[2], device=k.device).expand(batch, -1)  # static layout: slot j = position j
    seen = (pos < first)[:, None, :, None]  # [B, 1, L, 1]: a caller's tensor may hold anything where no query looks
    if step.prior_mask is not None:  # [B, 1, S, L]: slots no new token may see
        seen = seen & step.prior_mask.any(dim=2).unsqueeze(-1)
    return torch.where(seen, k, 0.0), torch.where(seen, v, 0.0), pos.masked_fill(pos >= first, -1)
