"""HF config -> AttentionConfig per layer, and RoPE frequencies against HF's own functions."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from distattn.hf import attention_config_from_hf
from distattn.ops.rope import inv_freq_for

from hf_reference import CHUNK, WINDOW, family_config


def test_gpt_oss_layers() -> None:
    cfg = family_config("gpt_oss")
    sliding, full = attention_config_from_hf(cfg, 0), attention_config_from_hf(cfg, 1)
    assert sliding.sliding_window == WINDOW and full.sliding_window is None
    for layer in (sliding, full):
        assert layer.has_sinks and layer.qkv_bias and layer.o_bias
        assert layer.rope.rope_type == "yarn" and layer.rope.truncate is False and layer.rope.factor == 32.0


def test_llama4_layers() -> None:
    cfg = family_config("llama4")
    layers = [attention_config_from_hf(cfg, i) for i in range(4)]
    for rope_layer in layers[:3]:
        assert rope_layer.attention_chunk_size == CHUNK and rope_layer.rope.interleaved
        assert rope_layer.qk_norm == "l2norm" and rope_layer.qk_norm_after_rope
        assert not rope_layer.attn_temperature_tuning
    nope = layers[3]  # every 4th layer: no RoPE, full attention, temperature tuning, no qk-norm
    assert nope.rope is None and nope.attention_chunk_size is None and nope.qk_norm is None
    assert nope.attn_temperature_tuning and nope.floor_scale == 4.0 and nope.attn_scale == 0.1


def test_other_families() -> None:
    qwen2 = attention_config_from_hf(family_config("qwen2"), 0)
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_window is None
    qwen3 = attention_config_from_hf(family_config("qwen3"), 1)
    assert qwen3.qk_norm == "rmsnorm" and not qwen3.qk_norm_after_rope and not qwen3.qkv_bias
    mistral = attention_config_from_hf(family_config("mistral"), 1)
    assert mistral.sliding_window == WINDOW and not mistral.qkv_bias
    llama = attention_config_from_hf(family_config("llama"), 0)
    assert llama.rope.rope_type == "llama3" and llama.rope.original_max_position_embeddings == 64
    windowed = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert [attention_config_from_hf(windowed, i).sliding_window for i in range(4)] == [None, None, 16, 16]
    with pytest.raises(ValueError, match="layer_idx=4 is outside the model's 4 layers"):
        attention_config_from_hf(windowed, 4)


ROPES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
]


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r["rope_type"] + ("-" + "-".join(sorted(set(r) - {"rope_type", "rope_theta"})) if len(r) > 2 else ""))
def test_rope_frequencies_match_hf(rope: dict) -> None:
    hf = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128, max_position_embeddings=131072, rope_parameters=dict(rope))
    expected, expected_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf) if rope["rope_type"] != "default" else (None, 1.0)
    ours_cfg = attention_config_from_hf(hf, 0)
    inv_freq, factor = inv_freq_for(ours_cfg.rope, ours_cfg.rotary_dim)
    if expected is None:
        dim = ours_cfg.rotary_dim
        expected = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    assert inv_freq.shape == expected.shape
    # HF computes in fp32: agreement to fp32 rounding
    assert torch.allclose(inv_freq, expected.double(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
