"""gpt-oss experts: MXFP4 checkpoints load like their dequantized twin; both ways of running experts agree."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distattn.models import DecoderLM, generate
from distattn.models.mxfp4 import dequantize_mxfp4

from test_models import PROMPTS, family_checkpoint


def _packed(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks `[E, out, G, 16]` (every nibble) and scales `[E, out, G]` around 2^0."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(122, 129, shape[:-1], generator=gen, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


def mxfp4_checkpoints(root: Path) -> tuple[Path, Path]:
    """The tiny gpt-oss checkpoint twice: experts as MXFP4 blocks + scales, and dequantized by transformers' own converter."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    family_checkpoint("gpt_oss", root / "base")
    config = json.loads((root / "base" / "config.json").read_text())
    tensors = load_file(str(root / "base" / "model.safetensors"))
    packed, dense = dict(tensors), dict(tensors)
    for name, tensor in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, rows, cols = tensor.shape  # [E, in, out]
            blocks, scales = _packed((e, cols, rows // 32, 16), seed=len(name) + rows)
            del packed[name]
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
            dense[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    for kind, state, extra in (("mxfp4", packed, {"quantization_config": {"quant_method": "mxfp4"}}), ("dense", dense, {})):
        (root / kind).mkdir()
        (root / kind / "config.json").write_text(json.dumps({**config, **extra}))
        save_file(state, str(root / kind / "model.safetensors"))
    return root / "mxfp4", root / "dense"


def test_our_dequantization_equals_transformers() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _packed((3, 64, 4, 16), seed=0)
    for dtype in (torch.float32, torch.bfloat16):
        expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert torch.equal(dequantize_mxfp4(blocks, scales, dtype), expected)  # exact: e2m1 values times powers of two


def test_an_mxfp4_checkpoint_loads_as_its_dequantized_twin(tmp_path) -> None:
    packed, dense = mxfp4_checkpoints(tmp_path)
    a, b = DecoderLM.from_pretrained(packed, dtype=torch.float64), DecoderLM.from_pretrained(dense, dtype=torch.float64)
    ids = torch.tensor([p[:4] for p in PROMPTS])
    cache_a, cache_b = a.new_cache(3, 16), b.new_cache(3, 16)
    logits = a(ids, position_ids=torch.arange(4).expand(3, 4), cache=cache_a)
    assert torch.equal(logits, b(ids, position_ids=torch.arange(4).expand(3, 4), cache=cache_b))  # the same weights, bit for bit
    assert generate(a, PROMPTS, max_new_tokens=10).tokens == generate(b, PROMPTS, max_new_tokens=10).tokens


def test_both_ways_of_running_experts_agree() -> None:
    """Gathering each token's experts (GPUs, few tokens: no host sync) and grouping tokens by expert compute the same."""
    import transformers

    from distattn.models.moe import GptOssMoE, Llama4MoE

    gpt = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2)
    llama = transformers.Llama4TextConfig(hidden_size=32, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2)
    gen = torch.Generator().manual_seed(0)
    for moe, scale_input in ((GptOssMoE(gpt, None, torch.float64), False), (Llama4MoE(llama, None, torch.float64), True)):
        with torch.no_grad():
            for p in moe.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        x = torch.randn(5, 32, generator=gen, dtype=torch.float64)
        ids = torch.randint(0, 6, (5, 2), generator=gen)
        scores = torch.rand(5, 2, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            gathered = moe.run_experts(x, ids, scores, scale_input=scale_input, gather=True)
            grouped = moe.run_experts(x, ids, scores, scale_input=scale_input, gather=False)
        torch.testing.assert_close(gathered, grouped, rtol=1e-12, atol=1e-12)  # fp64: the same sums in another order
