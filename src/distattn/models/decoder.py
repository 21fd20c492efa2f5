"""A compact decoder LM for the families our attention covers (Llama, Qwen2, Qwen3, Mistral, gpt-oss, Gemma 3 text).

embed -> [RMSNorm -> attention -> + residual -> RMSNorm -> MLP -> + residual] x L -> RMSNorm -> lm_head.
The attention's `rmsnorm` argument applies the first norm. The MLP is a gated MLP (SwiGLU; Gemma's GeGLU)
tensor-parallel like the attention heads (gate/up column-parallel, down row-parallel), or gpt-oss's
mixture of experts (`distattn.models.moe`). Gemma 3 adds a norm after attention and around the MLP,
scales the embeddings by sqrt(hidden) and weights its norms as (1 + w). Each layer's attention (window,
sinks, RoPE, QK-norm, scale) comes from `distattn.hf.attention_config_from_hf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import arguments as args
from ..cache import KVCacheManager, PagedKVCacheManager
from ..hf import CheckpointSource, attention_config_from_hf, hf_attention_shapes
from ..layers.attention import AttentionLayer
from ..layers.linear import (
    ColumnParallelLinear,
    ParallelLinear,
    RowParallelLinear,
    initialise_weights,
    int4_group_error,
    int4_reason,
    skip_weight_init,
)
from ..layers.lora import LoraAdapter, check_lora_fits
from ..layers.quant import WeightFormat, pack_reason, weight_format
from ..ops.kv_quant import KVCacheDtype, check_kv_cache_dtype
from ..parallel.groups import ParallelGroups
from ..parallel.plans import run_attention
from ..step.builder import CallArgs, bind_layer, build_step
from ..step.metadata import StepMetadata
from ..transaction import all_or_nothing
from .loader import FAMILIES, check_checkpoint, family_norm, is_gemma, layer_norm_names
from .mlp import GatedMLP, RMSNorm
from .moe import ExpertsMLP, GptOssMoE, Llama4MoE


class DecoderLayer(nn.Module):
    """One block: pre-norm attention and MLP with residuals; Gemma 3 also norms each output
    (`post_attention_layernorm`, `post_feedforward_layernorm`) and its MLP input (`pre_feedforward_layernorm`)."""

    self_attn: AttentionLayer
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm
    pre_feedforward_layernorm: RMSNorm
    post_feedforward_layernorm: RMSNorm

    def __init__(self, hf_config: Any, idx: int, groups: ParallelGroups, dtype: torch.dtype) -> None:
        super().__init__()
        self.gemma = is_gemma(hf_config)
        self.norm_names = layer_norm_names(hf_config)
        self.input_layernorm = family_norm(hf_config, dtype)
        config = dataclasses.replace(attention_config_from_hf(hf_config, idx), fused_qkv=True)  # one QKV matmul
        self.self_attn = AttentionLayer(config, groups=groups, layer_idx=idx, dtype=dtype)
        self.post_attention_layernorm = family_norm(hf_config, dtype)
        if self.gemma:
            self.pre_feedforward_layernorm = family_norm(hf_config, dtype)
            self.post_feedforward_layernorm = family_norm(hf_config, dtype)
        activation = str(getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", "silu"))
        self.mlp_names = "mlp."
        if hf_config.model_type == "gpt_oss":
            self.mlp: GatedMLP | GptOssMoE | Llama4MoE = GptOssMoE(hf_config, groups.tp, dtype)
        elif hf_config.model_type == "llama4_text":  # MoE layers interleaved with dense ones, as the config lists them
            self.mlp_names = "feed_forward."
            if idx in hf_config.moe_layers:
                self.mlp = Llama4MoE(hf_config, groups.tp, dtype)
            else:
                self.mlp = GatedMLP(hf_config.hidden_size, hf_config.intermediate_size_mlp, groups.tp, dtype, activation)
        else:
            self.mlp = GatedMLP(hf_config.hidden_size, hf_config.intermediate_size, groups.tp, dtype, activation)

    def load_mlp(self, source: Any, prefix: str) -> None:
        """This rank's share of the layer's MLP (dense, or a mixture of experts)."""
        if isinstance(self.mlp, GatedMLP):
            self.mlp.load(source, prefix, self.mlp_names)
        else:
            self.mlp.load(source, prefix)

    def forward(self, hidden: torch.Tensor, step: StepMetadata, idx: int) -> torch.Tensor:
        """hidden `[B, S, hidden]` -> `[B, S, hidden]`, for the model call `step` (this layer: `idx`)."""
        attn = self.self_attn
        attended = run_attention(attn, self.input_layernorm(hidden), bind_layer(step, idx, attn.attn_config, attn.n_kv_heads, hidden))[0]
        if self.gemma:
            hidden = hidden + self.post_attention_layernorm(attended)
            return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


# fp32 models narrower than this stay plain by default: oneDNN's per-call cost outweighs its faster streaming
# (decode step of a 2-layer model, batch 4, this CPU: hidden 128 plain 1.53 / packed 1.72 ms, 256: 2.96 / 2.10 ms)
PACK_FP32_MIN_WIDTH = 256


class DecoderLM(nn.Module):
    """A dense decoder LM over NeuronAttentionBase layers.

    Build with `DecoderLM.from_pretrained(checkpoint_dir, groups=..., dtype=...)`.
    forward(input_ids `[B, S]`, position_ids `[B, S]`, cache, attention_mask `[B, S]`,
    seq_ids `[B]`) -> logits `[B, S, vocab]`.
    """

    def __init__(self, hf_config: Any, *, groups: ParallelGroups | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        family = getattr(hf_config, "model_type", "")
        if family not in FAMILIES:
            raise ValueError(f"model_type={family!r} is not supported; distattn.models covers {FAMILIES}")
        self.config = hf_config
        self.generation_config: Any = None  # the checkpoint's generation_config.json (from_pretrained), if it has one
        self.groups = groups if groups is not None else ParallelGroups()
        empty = None if initialise_weights() else torch.empty(hf_config.vocab_size, hf_config.hidden_size, dtype=dtype)
        self.embed_tokens = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size, dtype=dtype, _weight=empty)
        self.layers = nn.ModuleList(DecoderLayer(hf_config, i, self.groups, dtype) for i in range(hf_config.num_hidden_layers))
        self.norm = family_norm(hf_config, dtype)
        # Gemma scales the embeddings by sqrt(hidden) (rounded to the weights' dtype, as HF) and may soft-cap the logits
        self.embed_scale = hf_config.hidden_size**0.5 if is_gemma(hf_config) else None
        self.logit_softcap = getattr(hf_config, "final_logit_softcapping", None)
        self.lm_head = ColumnParallelLinear(hf_config.hidden_size, hf_config.vocab_size, bias=False, dtype=dtype)  # replicated
        self._compiled_decode: Callable[..., torch.Tensor] | None = None  # see compile_decode
        self.kv_cache_dtype: KVCacheDtype | None = None  # how new_cache / new_paged_cache store K/V (None: the model's dtype)

    @classmethod
    def from_pretrained(
        cls, checkpoint: str | Path, *, groups: ParallelGroups | None = None, dtype: torch.dtype | str = torch.float32,
        pack: bool | None = None, quantize: str | None = None, kv_cache_dtype: str | None = None, device: torch.device | str | None = None,
    ) -> DecoderLM:
        """Build from a checkpoint directory (config.json + safetensors).

        Each rank reads from disk only its shards of the attention and MLP weights
        (safetensors slices); embeddings, norms and lm_head are replicated. Each tensor is read
        once, straight from the file into memory (no memory map held: peak host memory is the
        parameters plus the tensor in flight) and copied into its parameter.
        dtype: the parameters' floating dtype, or "auto": the checkpoint's (config.json's
            `torch_dtype` / `dtype`, float32 when it names none), as HF's dtype="auto".
        device: where the parameters are built and filled ("cuda", "cuda:1", ...): each tensor goes
            there as it is read, never a whole copy of the model in host memory first. Default: CPU.
        pack: hold the linear weights in oneDNN's layout (`pack_weights`); None packs where it is
            faster (`packs_by_default`: a CPU torch with oneDNN, bfloat16, or float32 from 256 wide;
            `benchmarks/model_bench.py`); moving the model elsewhere unpacks them.
        quantize: "int8" / "int4" holds the linear weights quantized (`quantize_weights`; not packed then).
        A checkpoint whose linear weights are int8 with a per-row `.scale` (NxDI's `per_channel_symmetric`
        quantized checkpoints) loads as an int8 model: each rank reads its rows' codes and scales.
        kv_cache_dtype: "fp8" / "int8" makes the caches this model builds (`new_cache`,
            `new_paged_cache`, hence `generate` and `serve`) store K/V quantized; None: in `dtype`.
        """
        root = Path(checkpoint)
        kv_scheme, target = _check_load_options(pack, quantize, kv_cache_dtype, device)
        hf_config = _read_config(root)
        dtype = _checkpoint_dtype(hf_config) if dtype == "auto" else args.float_dtype("dtype", dtype)
        source = CheckpointSource(root)  # no safetensors: an error now, before a model is built
        check_checkpoint(source, hf_config)
        if source.int8_weights():  # NxDI's quantized checkpoint: codes * scales on read, held as int8 again below
            if quantize not in (None, "int8") or pack:
                raise ValueError(f"checkpoint {str(root)!r} holds int8 weights with per-row scales: load it with quantize=None or "
                                 f"'int8' (not {'pack=True' if pack else repr(quantize)}), or quantize the float checkpoint instead")
            quantize = "int8"
        with skip_weight_init(), target:  # every weight is read below, onto the device
            model = cls(hf_config, groups=groups, dtype=dtype)
        packing = quantize is None and (pack or (pack is None and model.packs_by_default()))
        for module in model._linears():  # each weight packed, or kept as read, as it arrives: never a second copy
            if packing:
                module.pack_as_loaded()
            else:
                module.adopt_loads(True)
        model._load(source)
        for module in model._linears():
            module.adopt_loads(False)
        if (root / "generation_config.json").exists():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(root, local_files_only=True)
        model.kv_cache_dtype = kv_scheme
        if quantize is not None:
            model.quantize_weights(quantize)
        return model.eval()

    @torch.no_grad()
    def _load(self, source: CheckpointSource) -> None:
        """This rank's shards of every tensor (checked by `check_checkpoint`)."""
        embed = self.embed_tokens.weight
        embed.data = source.read("model.embed_tokens.weight").to(device=embed.device, dtype=embed.dtype).contiguous()  # fresh: kept
        self.norm.weight.copy_(source.read("model.norm.weight"))
        head = "lm_head.weight" if "lm_head.weight" in source.files else "model.embed_tokens.weight"  # tied when absent
        self.lm_head.load_shard(source.read(head))
        for i, layer in enumerate(self.blocks()):
            prefix = f"model.layers.{i}."
            for name in layer.norm_names:
                layer.get_parameter(f"{name}.weight").copy_(source.read(f"{prefix}{name}.weight"))
            layer.load_mlp(source, prefix)
            layer.self_attn.load_hf(source.sub(prefix + "self_attn."))  # shares the open files

    def blocks(self) -> list[DecoderLayer]:
        """The decoder layers, in order."""
        return [layer for layer in self.layers if isinstance(layer, DecoderLayer)]

    def _linears(self) -> list[ParallelLinear]:
        return [m for m in self.modules() if isinstance(m, ParallelLinear)]

    def describe(self) -> str:
        """One line saying what model this is: family, size, dtype, weight layout, parallel degrees."""
        cfg = self.config
        held = sum(m.weight.numel() for m in self._linears() if m.weight_format is not WeightFormat.DENSE)  # placeholders stand for them
        experts = sum(m.gate_up.numel() + m.down.numel() for m in self.modules()
                      if isinstance(m, ExpertsMLP) and m.weight_format is not WeightFormat.DENSE)
        params = sum(p.numel() for p in self.parameters() if 0 not in p.stride() or p.numel() <= 1) + held + experts
        packed = any(m.weight_format is WeightFormat.PACKED for m in self._linears())
        return (f"{cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} / "
                f"{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}, {params / 1e6:.1f}M parameters on this rank, "
                f"{str(self.embed_tokens.weight.dtype).replace('torch.', '')}, "
                f"{self.quantized() or ('packed' if packed else 'plain')} weights, "
                f"tp={self.groups.tp_size} cp={self.groups.cp_size} dp={self.groups.dp_size}")

    def packs_by_default(self) -> bool:
        """Whether from_pretrained packs this model's weights when not told (`pack=None`): where oneDNN's layout
        applies (`pack_reason`), bf16 always and fp32 from PACK_FP32_MIN_WIDTH wide (measured faster there)."""
        weight = self.lm_head.weight
        return pack_reason(weight) is None and (weight.dtype == torch.bfloat16 or self.config.hidden_size >= PACK_FP32_MIN_WIDTH)

    def pack_weights(self) -> None:
        """Hold every linear weight (projections, MLP, lm_head) in oneDNN's blocked layout.

        On this CPU (torch 2.13) that layout runs fp32 decode steps 1.3x (one row) to 2.7x (eight
        rows) and fp32 prefill 1.1-1.5x faster than `F.linear`, and bf16 products of any size ~2x
        faster (`benchmarks/model_bench.py`); memory is unchanged. `.to()` unpacks and packs again
        where the new weight can be; ValueError where it cannot be packed (not CPU, no oneDNN).
        """
        for module in self.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.pack()

    def compile_decode(self, enable: bool = True) -> None:
        """Run every later decode step (one new token per row) through `torch.compile`.

        The step is checked and described eagerly (`prepare_step`, as always); the layers,
        final norm and lm_head then run as one compiled graph that writes the cache in place.
        Same tokens as eager; on this CPU 1.2x (8-layer 1024-wide, batch 1) to 2x (tiny)
        faster per step after a one-off compile of 10-30 s (`benchmarks/model_bench.py`).
        Prefill and speculative steps stay eager (their shapes vary call by call). A new
        batch size or cache length recompiles once with dynamic shapes. tp=1, with plain
        (unpacked) or quantized weights (the int8 / int4 kernels are called from the graph).
        enable=False returns to eager steps.
        """
        args.flag("enable", enable)
        if enable and self.groups.tp_size > 1:
            raise ValueError(f"compile_decode() runs at tp=1 (this model has tp={self.groups.tp_size}); call it only without tensor parallelism")
        if enable and any(m.weight_format is WeightFormat.PACKED for m in self._linears()):
            raise ValueError("compile_decode() needs plain weights, and this model's are packed for oneDNN (CPU loads pack by "
                             "default, and packed eager steps are faster there): load it with from_pretrained(..., pack=False)")
        self._compiled_decode = torch.compile(self._layers_and_head) if enable else None

    def quantize_weights(self, kind: str = "int8") -> None:
        """Hold every linear weight (attention projections, dense MLPs, lm_head) quantized, weight-only.

        int8: symmetric per output channel (NxDI's `per_channel_symmetric`), each rank's shard with
        the scale of the whole row. int4: a bf16 scale and zero per 32 inputs of each row (layers whose
        outputs are not a multiple of 16, the int4 layout's, stay in the model's dtype). Decode steps
        read the codes through PyTorch's int8 / int4 kernels (bf16 activations); prefill dequantizes
        per product. MoE experts are quantized alike (a scale per expert and row; routers stay in the
        model's dtype). Accuracy: docs/accuracy.md.
        """
        held = weight_format(kind)
        if self.quantized() is not None:
            raise ValueError("this model's weights are quantized already")
        linears = [(name, m) for name, m in self.named_modules() if isinstance(m, ParallelLinear)]
        experts = [(name, e) for name, e in self.named_modules() if isinstance(e, ExpertsMLP)]
        if held is WeightFormat.INT4:
            linears = [(name, m) for name, m in linears if int4_reason(m) is None]  # others (a vocabulary of 97) stay in the model's dtype
            errors = [e for e in (int4_group_error(m, name) for name, m in linears) if e is not None]
            errors += [e for e in (m.int4_error(name) for name, m in experts) if e is not None]
            if errors:  # checked for every layer before any is quantized
                raise ValueError(f"quantize='int4': {errors[0]}; use quantize='int8' (or another tensor-parallel degree)")
        for _, linear in linears:
            if held is WeightFormat.INT4:
                linear.quantize_int4()
            else:
                linear.quantize_int8(linear.group if isinstance(linear, RowParallelLinear) else None)
        for _, expert in experts:
            expert.quantize_weights(held)

    def quantized(self) -> str | None:
        """"int8" / "int4" when the linear weights are quantized, else None."""
        for linear in self._linears():
            if linear.weight_format in (WeightFormat.INT8, WeightFormat.INT4):
                return linear.weight_format.value
        return None

    def load_lora_adapters(self, adapters: Sequence[str | Path | LoraAdapter]) -> None:
        """Load PEFT LoRA adapters (directories or `LoraAdapter`s) into every attention layer.

        `forward(..., adapter_ids=)` then picks one per row: an index into `adapters`, or -1
        for the base model. Each rank reads only its slices. An empty list removes them.
        """
        if isinstance(adapters, (str, Path, LoraAdapter)):
            raise TypeError("adapters must be a list of adapter directories or LoraAdapters: wrap a single one in [ ]")
        loaded = [a if isinstance(a, LoraAdapter) else LoraAdapter(a) for a in adapters]
        names = [a.name for a in loaded]
        if len(set(names)) != len(names):
            raise ValueError(f"adapters share names {names}: pass LoraAdapter(path, name=...) to tell them apart")
        for adapter in loaded:
            beyond = [i for i in adapter.layers if i >= len(self.layers)]
            if beyond:
                raise ValueError(f"LoRA adapter {adapter.name!r} adapts layers {beyond} but the model has {len(self.layers)}")
        for i, layer in enumerate(self.blocks()):  # every layer checked before any changes
            for adapter in loaded:
                check_lora_fits(adapter.layer(i), hf_attention_shapes(layer.self_attn.attn_config))
        with all_or_nothing(self, values=False):
            for i, layer in enumerate(self.blocks()):
                layer.self_attn.load_lora_adapters([a.layer(i) for a in loaded])

    def new_cache(self, max_batch_size: int, max_seq_len: int, speculation_width: int = 1) -> KVCacheManager:
        """A KV cache for every layer of this model on this rank (K/V stored as `self.kv_cache_dtype` says)."""
        return KVCacheManager.for_modules([layer.self_attn for layer in self.blocks()], max_batch_size=max_batch_size,
                                          max_seq_len=max_seq_len, speculation_width=speculation_width, kv_cache_dtype=self.kv_cache_dtype)

    def new_paged_cache(self, *, num_blocks: int, block_size: int = 16, max_batch_size: int, max_seq_len: int) -> PagedKVCacheManager:
        """A paged KV cache for every layer of this model on this rank (see `distattn.paged`; K/V as `self.kv_cache_dtype`)."""
        return PagedKVCacheManager.for_modules([layer.self_attn for layer in self.blocks()], num_blocks=num_blocks, block_size=block_size,
                                               max_batch_size=max_batch_size, max_seq_len=max_seq_len, kv_cache_dtype=self.kv_cache_dtype)

    def prepare_step(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: KVCacheManager | PagedKVCacheManager, *,
        attention_mask: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None, adapter_ids: torch.Tensor | None = None,
    ) -> StepMetadata:
        """Check one model call and describe it once (`distattn.step.build_step`): every layer trusts the result."""
        call = CallArgs(hidden, attention_mask, position_ids, adapter_ids=adapter_ids, kv_mgr=cache, extra={"seq_ids": seq_ids, "idx": 0})
        return build_step(call, self.blocks()[0].self_attn.facts(), self.groups)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        cache: KVCacheManager | PagedKVCacheManager,
        attention_mask: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        adapter_ids: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of new tokens `[B, S]` at `position_ids`, updating `cache`.

        The call is checked and described once (`prepare_step`) and every layer trusts that step.
        logits_at `[B, K]`: the columns whose logits are wanted (e.g. each row's last prompt token);
        the result is then `[B, K, vocab]` and the lm_head runs on those positions only. Default:
        every position, `[B, S, vocab]`. adapter_ids `[B]`: each row's LoRA adapter (see
        `load_lora_adapters`), -1 for none.
        """
        if not isinstance(cache, (KVCacheManager, PagedKVCacheManager)):
            raise TypeError(f"cache must be a KVCacheManager or PagedKVCacheManager (model.new_cache / new_paged_cache), got {type(cache).__name__}")
        hidden = self.embed(args.input_ids(input_ids, self.config.vocab_size))
        step = self.prepare_step(hidden, position_ids, cache, attention_mask=attention_mask, seq_ids=seq_ids, adapter_ids=adapter_ids)
        return self.run_layers(hidden, step, logits_at)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[B, S]` (checked by the caller) -> embeddings `[B, S, hidden]` (Gemma: scaled by sqrt(hidden),
        rounded to the weights' dtype as HF)."""
        hidden = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        return hidden

    def run_layers(self, hidden: torch.Tensor, step: StepMetadata, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens `[B, S, hidden]` of the call `step` through the layers, final norm and lm_head: logits
        `[B, S or K, vocab]`. A decode step (S = 1) runs compiled after `compile_decode()`."""
        run = self._compiled_decode if self._compiled_decode is not None and hidden.shape[1] == 1 else self._layers_and_head
        return run(hidden, step, logits_at)

    def _layers_and_head(self, hidden: torch.Tensor, step: StepMetadata, logits_at: torch.Tensor | None) -> torch.Tensor:
        """hidden `[B, S, hidden]` through every layer (trusting `step`), the final norm and the
        lm_head: logits `[B, S or K, vocab]`. Pure tensor work: no host syncs, one graph."""
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, step, i)
        if logits_at is not None:
            hidden = hidden.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, K, hidden]
        logits = self.lm_head(self.norm(hidden))
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def _check_load_options(pack: bool | None, quantize: str | None, kv_cache_dtype: str | None,
                        device: torch.device | str | None) -> tuple[KVCacheDtype | None, torch.device]:
    """from_pretrained's options checked (ValueError / TypeError naming the first bad one): the KV cache scheme and
    the device the model is built on."""
    if pack is not None:
        args.flag("pack", pack)
    if quantize not in (None, "int8", "int4"):
        raise ValueError(f"quantize={quantize!r}: pass None, 'int8' or 'int4'")
    if quantize is not None and pack:
        raise ValueError("pack=True and quantize hold the weights two ways: pick one")
    try:
        target = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device: pass 'cpu', 'cuda' or 'cuda:N'") from None
    if target.type == "cuda" and (not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA "
                         "device(s) (or this torch build has no CUDA): pass device='cpu' or a device that exists")
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: distattn runs on 'cpu' or 'cuda'")
    if pack and target.type != "cpu":
        raise ValueError(f"pack=True holds weights in oneDNN's CPU layout; device={device!r} is not the CPU: leave pack=None")
    return check_kv_cache_dtype(kv_cache_dtype), target


def _checkpoint_dtype(hf_config: Any) -> torch.dtype:
    """dtype="auto": the dtype config.json names (`torch_dtype`, or transformers 5's `dtype`), float32 when none."""
    named = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)  # optional HF config fields
    if named is None:
        return torch.float32
    dtype = named if isinstance(named, torch.dtype) else getattr(torch, str(named).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype='auto': config.json names dtype {named!r}, not a floating dtype; pass dtype= explicitly")
    return dtype


def _read_config(root: Path) -> Any:
    """The HF config of a checkpoint directory; ValueError naming the directory and the reason otherwise."""
    from transformers import AutoConfig

    if not (root / "config.json").exists():
        raise ValueError(f"checkpoint {str(root)!r} has no config.json; pass a directory saved with save_pretrained")
    try:
        hf_config = AutoConfig.from_pretrained(root, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"checkpoint {str(root)!r}: config.json cannot be read as an HF config ({err})") from err
    family = getattr(hf_config, "model_type", "")
    if family not in FAMILIES:
        raise ValueError(f"model_type={family!r} is not supported; distattn.models covers {FAMILIES}")
    return hf_config
