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
