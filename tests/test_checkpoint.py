"""Attention weights read from a saved HF checkpoint (save_pretrained, single file and sharded)."""

from __future__ import annotations

import pytest
import torch

from distattn import NeuronAttentionBase
from distattn.hf import attention_config_from_hf, load_attention_weights

from hf_reference import attention_layers, build_model


@pytest.mark.parametrize("shard", [None, "50KB"], ids=["one-file", "sharded"])
def test_weights_from_saved_checkpoint_equal_the_model(tmp_path, shard) -> None:
    model = build_model("gpt_oss")
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path, **kwargs)
    if shard is not None:
        assert (tmp_path / "model.safetensors.index.json").exists()
    for layer, attn in enumerate(attention_layers(model)):
        loaded = load_attention_weights(tmp_path, layer)
        expected = attn.state_dict()
        assert set(loaded) == set(expected)
        assert all(torch.equal(loaded[n], expected[n]) for n in expected)
        module = NeuronAttentionBase(attention_config_from_hf(model.config, layer))
        module.load_hf_state_dict(loaded)  # the loader's output fits the layer as it is


def test_a_rank_reads_only_its_heads(tmp_path) -> None:
    """CheckpointSource reads the slices a layout asks for, not whole tensors."""
    from distattn.hf import CheckpointSource
    from distattn.parallel import HeadLayout
    from distattn.layers.projections import cut_heads

    model = build_model("llama")
    model.save_pretrained(tmp_path)
    cfg = attention_config_from_hf(model.config, 0)
    source = CheckpointSource(tmp_path, "model.layers.0.self_attn.")
    full = attention_layers(model)[0].state_dict()
    layout = HeadLayout.from_config(cfg, tp_size=2, tp_rank=1)  # q heads 2, 3 and kv head 1 of 4 / 2
    q_rows = cut_heads(source, "q_proj.weight", layout.q_heads, cfg.head_dim)
    assert torch.equal(q_rows, full["q_proj.weight"][2 * cfg.head_dim : 4 * cfg.head_dim])
    o_cols = cut_heads(source, "o_proj.weight", layout.q_heads, cfg.head_dim, dim=1)
    assert torch.equal(o_cols, full["o_proj.weight"][:, 2 * cfg.head_dim : 4 * cfg.head_dim])
    assert source.bytes_read == (q_rows.numel() + o_cols.numel()) * 4  # half of each tensor, nothing more
