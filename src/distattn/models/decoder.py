"""A compact decoder LM for the dense families our attention covers (Llama, Qwen2, Qwen3, Mistral).

embed -> [RMSNorm -> attention -> + residual -> RMSNorm -> SwiGLU MLP -> + residual] x L
-> RMSNorm -> lm_head. The attention's `rmsnorm` argument applies the first norm; the MLP is tensor-parallel (gate/up column-parallel,
down row-parallel) over the same group as the attention heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..attention import NeuronAttentionBase
from ..hf import attention_config_from_hf, load_attention_weights
from ..kv_cache import KVCacheManager
from ..parallel import ColumnParallelLinear, ParallelGroups, RowParallelLinear

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


class RMSNorm(nn.Module):
    """HF's RMSNorm: normalise in fp32 (fp64 for fp64), scale in the input dtype."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., size]` -> same shape and dtype."""
        acc = x.to(torch.promote_types(x.dtype, torch.float32))
        acc = acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * acc.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), tensor-parallel over `group`."""

    def __init__(self, hidden: int, intermediate: int, group: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, intermediate, bias=False, group=group, dtype=dtype)
        self.up_proj = ColumnParallelLinear(hidden, intermediate, bias=False, group=group, dtype=dtype)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=False, group=group, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, S, hidden]` -> `[B, S, hidden]` (all-reduced)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, idx: int, groups: ParallelGroups, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, dtype)
        self.self_attn = NeuronAttentionBase(attention_config_from_hf(hf_config, idx), groups=groups, layer_idx=idx, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, dtype)
        self.mlp = SwiGLU(hf_config.hidden_size, hf_config.intermediate_size, groups.tp, dtype)

    def forward(self, hidden: torch.Tensor, **attention_kwargs: Any) -> torch.Tensor:
        """hidden `[B, S, hidden]` -> `[B, S, hidden]`."""
        hidden = hidden + self.self_attn(hidden, rmsnorm=self.input_layernorm, **attention_kwargs).hidden_states
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


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
        self.groups = groups if groups is not None else ParallelGroups()
        self.embed_tokens = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(hf_config, i, self.groups, dtype) for i in range(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, dtype)
        self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False, dtype=dtype)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, *, groups: ParallelGroups | None = None, dtype: torch.dtype = torch.float32) -> DecoderLM:
        """Build from a checkpoint directory (config.json + safetensors); each rank keeps its shards."""
        from safetensors import safe_open
        from transformers import AutoConfig

        root = Path(checkpoint)
        hf_config = AutoConfig.from_pretrained(root, local_files_only=True)
        model = cls(hf_config, groups=groups, dtype=dtype)
        index = root / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [p.name for p in root.glob("*.safetensors")]
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(root / file), framework="pt") as handle:
                for name in handle.keys():
                    if ".self_attn." not in name:  # attention tensors are read per layer below
                        tensors[name] = handle.get_tensor(name)
        with torch.no_grad():
            model.embed_tokens.weight.copy_(tensors["model.embed_tokens.weight"])
            model.norm.weight.copy_(tensors["model.norm.weight"])
            model.lm_head.weight.copy_(tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]))  # tied when absent
            for i, layer in enumerate(model.layers):
                prefix = f"model.layers.{i}."
                layer.input_layernorm.weight.copy_(tensors[prefix + "input_layernorm.weight"])
                layer.post_attention_layernorm.weight.copy_(tensors[prefix + "post_attention_layernorm.weight"])
                layer.mlp.gate_proj.load_full(tensors[prefix + "mlp.gate_proj.weight"])
                layer.mlp.up_proj.load_full(tensors[prefix + "mlp.up_proj.weight"])
                layer.mlp.down_proj.load_full(tensors[prefix + "mlp.down_proj.weight"])
                attn = {k: v.to(dtype) for k, v in load_attention_weights(root, i).items()}
                layer.self_attn.load_hf_state_dict(attn)
        return model.eval()

    def new_cache(self, max_batch_size: int, max_seq_len: int, speculation_width: int = 1) -> KVCacheManager:
        """A KV cache for every layer of this model on this rank."""
        return KVCacheManager.for_modules([layer.self_attn for layer in self.layers], max_batch_size=max_batch_size,
                                          max_seq_len=max_seq_len, speculation_width=speculation_width)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        cache: KVCacheManager,
        attention_mask: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, S, vocab]` of new tokens `[B, S]` at `position_ids`, updating `cache`."""
        hidden = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, attention_mask=attention_mask, position_ids=position_ids, kv_mgr=cache, idx=i, seq_ids=seq_ids)
        return self.lm_head(self.norm(hidden))
