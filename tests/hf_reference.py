"""Tiny Hugging Face models with random weights, and traces of their attention layers.

The reference for a layer is HF's own attention module run inside HF's own model
on the whole token sequence (one forward, HF's masks, no cache): by causality its
output at position p is what incremental prefill + decode must produce at p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
WINDOW = 8  # sliding window of the windowed families
CHUNK = 8  # Llama 4 attention chunk


def _common(**overrides: object) -> dict:
    base = dict(
        vocab_size=97,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,  # = factor x original length for yarn
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return base


def family_config(family: str, **overrides: object) -> transformers.PretrainedConfig:
    """A tiny config for each family under test (`overrides` replace its fields)."""
    config = _family_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _family_config(family: str) -> transformers.PretrainedConfig:
    if family == "gpt_oss":
        return transformers.GptOssConfig(
            **_common(num_local_experts=2, num_experts_per_tok=1, sliding_window=WINDOW, attention_bias=True),
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "qwen2":
        return transformers.Qwen2Config(**_common())
    if family == "qwen3":
        return transformers.Qwen3Config(**_common())
    if family == "mistral":
        return transformers.MistralConfig(**_common(sliding_window=WINDOW))
    if family == "llama":
        return transformers.LlamaConfig(
            **_common(attention_bias=True),
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "llama4":
        return transformers.Llama4TextConfig(
            **_common(num_hidden_layers=4, intermediate_size_mlp=96),
            num_local_experts=2,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            attention_chunk_size=CHUNK,
            use_qk_norm=True,
            attn_temperature_tuning=True,
            floor_scale=4,  # small, so the NoPE temperature changes within the test's positions
            attn_scale=0.1,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **_common(sliding_window=WINDOW),
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,  # not head_dim: the scale differs from the default
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        )
    raise ValueError(family)


FAMILIES = ["gpt_oss", "qwen2", "qwen3", "mistral", "llama", "llama4", "gemma3"]


def build_model(family: str, *, seed: int = 0, attn_implementation: str = "eager", **overrides: object) -> transformers.PreTrainedModel:
    """An HF causal LM with random weights large enough to make attention non-trivial."""
    torch.manual_seed(seed)
    config = family_config(family, **overrides)
    config._attn_implementation = attn_implementation
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "self_attn" in name:
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
                elif name.endswith("sinks"):
                    param.copy_(torch.randn(param.shape, generator=gen))
                else:  # projections and biases: scores of order 1-5
                    param.copy_(0.15 * torch.randn(param.shape, generator=gen))
    return model.eval()


def attention_layers(model: transformers.PreTrainedModel) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


@dataclass
class Trace:
    inputs: list[torch.Tensor]  # per layer: hidden_states entering self_attn [1, T, hidden]
    outputs: list[torch.Tensor]  # per layer: self_attn output [1, T, hidden]


@torch.no_grad()
def trace(model: transformers.PreTrainedModel, input_ids: torch.Tensor) -> Trace:
    """Run HF once over `input_ids` [1, T] and record every attention layer's input and output."""
    layers = attention_layers(model)
    inputs: list = [None] * len(layers)
    outputs: list = [None] * len(layers)
    handles = []
    for i, attn in enumerate(layers):

        def hook(mod, args, kwargs, out, i=i):
            hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            inputs[i] = hs.detach().clone()
            outputs[i] = out[0].detach().clone()

        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return Trace(inputs, outputs)
