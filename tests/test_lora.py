"""Multi-LoRA: each row's adapter equals the base module with that adapter merged, and PEFT's own forward."""

from __future__ import annotations

import json

import pytest
import torch

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase
from distattn.hf import hf_attention_shapes
from distattn.lora import LoraAdapter, LoraWeights
from distattn.models import DecoderLM, generate

import tolerances
from test_models import PROMPTS, family_checkpoint

HIDDEN, HEADS, KV_HEADS, DIM = 32, 4, 2, 8
ADAPTER_IDS = [0, -1, 1, 0]  # a batch mixing two adapters and a row without one
PROMPT_LENS = (9, 6, 7, 3)


def random_adapter(config: AttentionConfig, rank: int, targets: tuple[str, ...], scale: float, seed: int) -> LoraWeights:
    """A and B of every target projection, HF shapes, random (B is non-zero, unlike a fresh PEFT init)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for proj in targets:
        out, width = hf_attention_shapes(config)[f"{proj}.weight"]
        tensors[f"{proj}.lora_A.weight"] = 0.3 * torch.randn(rank, width, generator=gen, dtype=torch.float64)
        tensors[f"{proj}.lora_B.weight"] = 0.3 * torch.randn(out, rank, generator=gen, dtype=torch.float64)
    return LoraWeights.from_tensors(tensors, scale, name=f"lora{seed}")


def merged(weights: dict[str, torch.Tensor], adapter: LoraWeights) -> dict[str, torch.Tensor]:
    """W + scale * B A for every adapted projection."""
    out = dict(weights)
    for name in adapter.shapes():
        if name.endswith("lora_A.weight"):
            proj = name.split(".")[0]
            b, a = adapter.source.read(f"{proj}.lora_B.weight"), adapter.source.read(name)
            out[f"{proj}.weight"] = weights[f"{proj}.weight"] + adapter.scale * b @ a
    return out


def drive(module: NeuronAttentionBase, x: torch.Tensor, adapter_ids: torch.Tensor | None) -> list[torch.Tensor]:
    """Padded prefill, 3 decode steps, one 3-token speculative step; every call's output (padding zeroed)."""
    batch = x.shape[0]
    cache = KVCacheManager.for_modules([module], max_batch_size=batch, max_seq_len=24, speculation_width=3)
    width = max(PROMPT_LENS)
    valid = torch.arange(width).expand(batch, width) < torch.tensor(PROMPT_LENS).unsqueeze(1)
    out = module(x[:, :width], attention_mask=valid, position_ids=torch.arange(width).expand(batch, width), kv_mgr=cache, idx=0,
                 adapter_ids=adapter_ids)
    outputs = [out.hidden_states.masked_fill(~valid.unsqueeze(-1), 0)]
    starts = torch.tensor(PROMPT_LENS)
    for width in (1, 1, 1, 3):
        pos = starts.unsqueeze(1) + torch.arange(width)
        hidden = torch.stack([x[b, pos[b]] for b in range(batch)])
        outputs.append(module(hidden, position_ids=pos, kv_mgr=cache, idx=0, adapter_ids=adapter_ids).hidden_states)
        starts = starts + width
    return outputs


CONFIGS = {
    "separate+bias": dict(qkv_bias=True, o_bias=True),
    "fused+sinks+window": dict(fused_qkv=True, learned_sinks_size=1, sliding_window=4),
    "chunk+qknorm": dict(attention_chunk_size=4, qk_norm="rmsnorm"),
}


@pytest.mark.parametrize("fields", CONFIGS.values(), ids=CONFIGS.keys())
def test_each_row_equals_its_merged_adapter(fields: dict) -> None:
    cfg = AttentionConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM, **fields)
    gen = torch.Generator().manual_seed(0)
    weights = {n: 0.3 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in hf_attention_shapes(cfg).items()}
    adapters = [
        random_adapter(cfg, 4, ("q_proj", "k_proj", "v_proj", "o_proj"), 2.0, seed=1),
        random_adapter(cfg, 2, ("q_proj", "v_proj"), 0.5, seed=2),  # another rank, a subset of targets
    ]
    module = NeuronAttentionBase(cfg, dtype=torch.float64)
    module.load_hf_state_dict(weights)
    module.load_lora_adapters(adapters)
    x = torch.randn(len(ADAPTER_IDS), 16, HIDDEN, generator=gen, dtype=torch.float64)
    got = drive(module, x, torch.tensor(ADAPTER_IDS))
    for adapter_id in set(ADAPTER_IDS):
        reference = NeuronAttentionBase(cfg, dtype=torch.float64)
        reference.load_hf_state_dict(weights if adapter_id < 0 else merged(weights, adapters[adapter_id]))
        expected = drive(reference, x, None)
        rows = [b for b, a in enumerate(ADAPTER_IDS) if a == adapter_id]
        for step, (e, g) in enumerate(zip(expected, got)):
            # fp64 on both sides; x(W + sBA) vs xW + s(xA)B only reassociates sums
            assert (e[rows] - g[rows]).abs().max().item() <= tolerances.FP64, f"adapter {adapter_id}, call {step}"


def test_adapters_change_outputs_and_none_restores_the_base() -> None:
    """The comparison above cannot pass by accident: adapters do change the output, and removing them restores it."""
    cfg = AttentionConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM)
    module = NeuronAttentionBase(cfg, dtype=torch.float64)
    x = torch.randn(2, 5, HIDDEN, dtype=torch.float64)
    base = module(x).hidden_states
    module.load_lora_adapters([random_adapter(cfg, 4, ("o_proj",), 1.0, seed=3)])
    adapted = module(x, adapter_ids=torch.tensor([0, -1])).hidden_states
    assert (adapted[0] - base[0]).abs().max() > 0.1
    assert torch.equal(adapted[1], base[1])  # the row without an adapter is the base model exactly
    module.load_lora_adapters([])
    assert torch.equal(module(x).hidden_states, base)


def test_adapter_errors_name_the_problem() -> None:
    cfg = AttentionConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM)
    module = NeuronAttentionBase(cfg)
    good = random_adapter(cfg, 4, ("q_proj",), 1.0, seed=1)
    module.load_lora_adapters([good])
    with pytest.raises(ValueError, match=r"adapter_ids \[0, 1\] has an id outside \[-1, 1\)"):
        module(torch.randn(2, 3, HIDDEN), adapter_ids=torch.tensor([0, 1]))
    bad_shape = LoraWeights.from_tensors({"k_proj.lora_A.weight": torch.zeros(4, HIDDEN), "k_proj.lora_B.weight": torch.zeros(32, 4)}, 1.0, "wide")
    with pytest.raises(ValueError, match=r"LoRA adapter 'wide' does not fit this layer: .*k_proj.lora_B.weight: \[32, 4\] vs \[16, 4\]"):
        module.load_lora_adapters([bad_shape])
    half = LoraWeights.from_tensors({"q_proj.lora_A.weight": torch.zeros(4, HIDDEN)}, 1.0, "half")
    with pytest.raises(ValueError, match=r"A without B .*\['q_proj.lora_A.weight'\]"):
        module.load_lora_adapters([half])
    assert module.adapter_names == ("lora1",)  # a refused load changes nothing


# ---- PEFT: adapters created and saved by the peft library, loaded through our PEFT reader ------------------

peft = pytest.importorskip("peft")


def save_peft_adapters(hf_model, root) -> list:
    """Two PEFT adapters on a model, saved in PEFT's format: rank 4 on q/k/v/o, and rank 2 rsLoRA on q/v."""
    specs = [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], use_rslora=True),
    ]
    paths = []
    for i, spec in enumerate(specs):
        torch.manual_seed(10 + i)
        wrapped = peft.get_peft_model(hf_model, peft.LoraConfig(init_lora_weights=False, **spec))  # B random, not zero
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.3)
        wrapped.save_pretrained(root / f"adapter{i}")
        hf_model = wrapped.unload()  # the base model again, without LoRA layers
        paths.append(root / f"adapter{i}")
    return paths


def test_mixed_batch_equals_peft_forward(tmp_path) -> None:
    hf = family_checkpoint("llama", tmp_path / "base")  # fp64, q/k/v/o biases
    paths = save_peft_adapters(hf, tmp_path)
    reference = peft.PeftModel.from_pretrained(hf, paths[0], adapter_name="a0")
    reference.load_adapter(paths[1], adapter_name="a1")
    reference = reference.double().eval()
    ours = DecoderLM.from_pretrained(tmp_path / "base", dtype=torch.float64)
    ours.load_lora_adapters(paths)
    ids = torch.tensor([p[:4] for p in PROMPTS])
    names = ["a0", "__base__", "a1"]  # peft's mixed-batch forward: one adapter per row
    with torch.no_grad():
        expected = reference(input_ids=ids, adapter_names=names).logits
    cache = ours.new_cache(len(PROMPTS), 16)
    got = ours(ids, position_ids=torch.arange(4).expand(3, 4), cache=cache, adapter_ids=torch.tensor([0, -1, 1]))
    assert (got - expected).abs().max().item() <= tolerances.FP64_VS_HF  # HF's RoPE angles are fp32
    # and the adapters matter: the base model's logits for the adapted rows are far off
    base = ours(ids, position_ids=torch.arange(4).expand(3, 4), cache=ours.new_cache(3, 16))
    for row in (0, 2):
        assert (base[row] - expected[row]).abs().max().item() > 100 * tolerances.FP64_VS_HF


@pytest.mark.parametrize("family,draft", [("llama", "none"), ("llama", "prompt_lookup"), ("gpt_oss", "none"), ("gemma3", "none")])
def test_generation_with_adapters_equals_peft_generate(tmp_path, family: str, draft: str) -> None:
    hf = family_checkpoint(family, tmp_path / "base")
    paths = save_peft_adapters(hf, tmp_path)
    ours = DecoderLM.from_pretrained(tmp_path / "base", dtype=torch.float64)
    ours.load_lora_adapters(paths)
    adapter_ids = [1, -1, 0]
    got = generate(ours, PROMPTS, max_new_tokens=8, adapter_ids=adapter_ids, draft=draft, stop_tokens=[]).tokens
    reference = peft.PeftModel.from_pretrained(hf, paths[0], adapter_name="a0")
    reference.load_adapter(paths[1], adapter_name="a1")
    reference = reference.double().eval()
    for prompt, adapter_id, tokens in zip(PROMPTS, adapter_ids, got):
        name = "__base__" if adapter_id < 0 else f"a{adapter_id}"
        out = reference.generate(input_ids=torch.tensor([prompt]), adapter_names=[name], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist(), f"adapter {name}"


def test_peft_reader_refuses_what_it_cannot_apply(tmp_path) -> None:
    hf = family_checkpoint("llama", tmp_path / "base")
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    wrapped.save_pretrained(tmp_path / "mlp")
    with pytest.raises(ValueError, match=r"adapts modules distattn does not apply LoRA to: \['model.layers.0.mlp.gate_proj"):
        LoraAdapter(tmp_path / "mlp")
    config = json.loads((tmp_path / "mlp" / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True: DoRA is not supported"):
        LoraAdapter(tmp_path / "dora")
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        LoraAdapter(tmp_path)


def test_an_adapter_on_some_layers_only(tmp_path) -> None:
    """PEFT's layers_to_transform: layer 0 keeps its base weights, layer 1 is adapted; logits equal peft's."""
    hf = family_checkpoint("llama", tmp_path / "base")
    torch.manual_seed(5)
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "o_proj"], layers_to_transform=[1],
                                                      init_lora_weights=False))
    wrapped.save_pretrained(tmp_path / "late")
    adapter = LoraAdapter(tmp_path / "late")
    assert adapter.layers == [1] and adapter.layer(0).source is None
    ours = DecoderLM.from_pretrained(tmp_path / "base", dtype=torch.float64)
    ours.load_lora_adapters([adapter])
    ids = torch.tensor([PROMPTS[0][:6]])
    got = ours(ids, position_ids=torch.arange(6).unsqueeze(0), cache=ours.new_cache(1, 8), adapter_ids=torch.tensor([0]))
    with torch.no_grad():
        expected = wrapped.double()(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= tolerances.FP64_VS_HF  # HF's RoPE angles are fp32
