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


def test_the_reader_gives_safetensors_own_tensors_and_slices(tmp_path) -> None:
    """SafetensorsFile (positioned reads, no memory map) against safetensors' own reader: every dtype a checkpoint
    holds, whole tensors, row slices and column slices read in several blocks."""
    from safetensors.torch import load_file, save_file

    from distattn import safetensors_file
    from distattn.safetensors_file import SafetensorsFile

    gen = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(7, 5, generator=gen).bfloat16(), "f32": torch.randn(3, 4, 6, generator=gen),
               "f16": torch.randn(9, generator=gen).half(), "i8": torch.randint(-128, 127, (4, 8), dtype=torch.int8, generator=gen),
               "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    expected, file = load_file(str(tmp_path / "t.safetensors")), SafetensorsFile(tmp_path / "t.safetensors")
    assert sorted(file.keys()) == sorted(tensors) and file.dtype_name("bf16") == "BF16" and file.shape("f32") == (3, 4, 6)
    for name, t in expected.items():
        got = file.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    old, safetensors_file.BLOCK_BYTES = safetensors_file.BLOCK_BYTES, 20  # a column slice over several blocks of rows
    try:
        assert torch.equal(file.read("bf16", 0, 2, 6), expected["bf16"][2:6])
        assert torch.equal(file.read("bf16", 1, 1, 4), expected["bf16"][:, 1:4])
        assert torch.equal(file.read("f32", 2, 3, 6), expected["f32"][:, :, 3:6])
    finally:
        safetensors_file.BLOCK_BYTES = old
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cut.safetensors' cannot be read .* truncated or corrupt"):
        SafetensorsFile(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"junk.safetensors' cannot be read"):
        SafetensorsFile(tmp_path / "junk.safetensors")


def test_from_pretrained_takes_the_checkpoints_dtype_and_a_device(tmp_path) -> None:
    """dtype="auto" is the dtype config.json names (HF's dtype="auto"); device= builds and fills the parameters there
    (the CPU here; CUDA where one is at hand); the logits equal a load in that dtype."""
    from distattn.models import DecoderLM

    from test_models import family_checkpoint

    hf = family_checkpoint("llama", tmp_path)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    auto = DecoderLM.from_pretrained(tmp_path, dtype="auto", pack=False)
    explicit = DecoderLM.from_pretrained(tmp_path, dtype=torch.bfloat16, pack=False)
    assert auto.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.tensor([[5, 6, 7, 8]])
    pos = torch.arange(4).view(1, -1)
    with torch.no_grad():
        assert torch.equal(auto(ids, position_ids=pos, cache=auto.new_cache(1, 8)), explicit(ids, position_ids=pos, cache=explicit.new_cache(1, 8)))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        model = DecoderLM.from_pretrained(tmp_path, dtype="auto", device=device)
        assert {p.device.type for p in model.parameters()} == {device}
        with torch.no_grad():
            got = model(ids.to(device), position_ids=pos.to(device), cache=model.new_cache(1, 8))
        assert (got.float().cpu() - explicit(ids, position_ids=pos, cache=explicit.new_cache(1, 8)).float()).abs().max() < 0.1  # bf16
    with pytest.raises(ValueError, match=r"device='tpu' is not a device"):
        DecoderLM.from_pretrained(tmp_path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda': this machine has no CUDA device"):
            DecoderLM.from_pretrained(tmp_path, device="cuda")
