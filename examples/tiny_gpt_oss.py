"""A tiny gpt-oss attention layer with random weights, and a driver for prefill/decode/speculation.

Shared by the examples; nothing is downloaded.
"""

from __future__ import annotations

import torch
import transformers

import distattn
from distattn.hf import attention_config_from_hf


def hf_config() -> transformers.GptOssConfig:
    """gpt-oss's attention at toy size: 8 q / 2 kv heads, sinks, qkv+o bias, YaRN, window 8 on layer 0."""
    config = transformers.GptOssConfig(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64},
    )
    config._attn_implementation = "eager"
    return config


def hf_attention(config: transformers.GptOssConfig, layer: int, seed: int = 0) -> torch.nn.Module:
    """HF's GptOssAttention with random weights (the same for the same seed)."""
    torch.manual_seed(seed)
    attn = transformers.models.gpt_oss.modeling_gpt_oss.GptOssAttention(config, layer_idx=layer).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.15)
    return attn


def layer_config(config: transformers.GptOssConfig, layer: int) -> distattn.AttentionConfig:
    return attention_config_from_hf(config, layer)


@torch.no_grad()
def run_steps(
    module: distattn.NeuronAttentionBase, cache: distattn.KVCacheManager, x: torch.Tensor, prompts: tuple[int, ...], steps: int, spec: int
) -> list[torch.Tensor]:
    """Prefill right-padded prompts, `steps` decode steps, one `spec`-token step.

    Args:
        x: `[B, T, hidden]` every row's tokens (T >= max(prompts) + steps + spec).

    Returns:
        per row, the outputs at its positions `[prompt + steps + spec, hidden]`.
    """
    batch = x.shape[0]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    offsets = [0] * batch
    for width in [list(prompts)] + [[1] * batch] * steps + [[spec] * batch]:
        seq = max(width)
        pos = torch.stack([torch.arange(o, o + seq) for o in offsets])  # [B, seq]
        valid = torch.arange(seq).expand(batch, seq) < torch.tensor(width).unsqueeze(1)
        hidden = torch.stack([x[b, offsets[b] : offsets[b] + seq] for b in range(batch)])  # [B, seq, hidden]
        out = module(hidden, attention_mask=valid, position_ids=pos, kv_mgr=cache, idx=module.layer_idx)
        for b in range(batch):
            outputs[b].append(out.hidden_states[b, : width[b]])
        offsets = [o + w for o, w in zip(offsets, width)]
    return [torch.cat(parts) for parts in outputs]
