"""int8 / int4 weights: products equal their dequantized weights'; whole models, quantized cache included, stay close to fp32."""

from __future__ import annotations

import pytest
import torch

from distattn.models import DecoderLM, generate
from distattn.models.accuracy import agreement, decode_logits
from distattn.parallel import ColumnParallelLinear

from test_models import PROMPTS, family_checkpoint
import tolerances as tol
from tolerances import INT8_KERNEL_BF16


@torch.no_grad()
def test_int8_products_equal_the_dequantized_weight() -> None:
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 48, bias=True)
    layer.bias.normal_()
    weight = layer.weight.detach().clone()
    layer.quantize_int8()
    scale = weight.abs().amax(1) / 127  # per output row
    assert torch.equal(layer.qweight, torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
    dequantized = layer.qweight.float() * layer.qscale.float()[:, None]
    assert (dequantized - weight).abs().max() <= scale.max() / 2 + 1e-7  # at most half a step per weight
    few, many = torch.randn(1, 3, 64), torch.randn(2, 40, 64)  # a decode step's rows (int8 kernel), a prefill's (dequantized)
    kernel = few.to(torch.bfloat16).float() @ (layer.qweight.float() * layer.qscale.to(torch.bfloat16).float()[:, None]).T
    got = layer(few)
    assert ((got - layer.bias - kernel).abs() / kernel.abs().clamp(min=1)).max() <= INT8_KERNEL_BF16
    torch.testing.assert_close(layer(many), many @ dequantized.T + layer.bias, rtol=1e-5, atol=1e-5)  # fp32 throughout


@torch.no_grad()
def test_int4_products_equal_the_dequantized_weight() -> None:
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 48, bias=False)
    weight = layer.weight.detach().clone()
    layer.quantize_int4()
    groups = weight.reshape(48, 2, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    scale_zero = layer.q4_scale_zero.float().transpose(0, 1)  # [out, groups, (scale, zero)]
    dequantized = ((layer.q4_codes.float().reshape(48, 2, 32) - 8) * scale_zero[..., :1] + scale_zero[..., 1:]).reshape(48, 64)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)  # the scheme in plain torch: 16 levels from each group's min
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    assert torch.equal(layer.q4_codes.float().reshape(48, 2, 32), codes)  # bit for bit
    assert torch.equal(scale_zero, torch.stack([scale, low + 8 * scale], -1).to(torch.bfloat16).float())
    step = ((high - low) / 15).repeat_interleave(32, dim=1)
    assert ((dequantized - weight).abs() <= step / 2 + 2**-8 * weight.abs().amax()).all()  # half a step, plus bf16 scales
    few, many = torch.randn(1, 3, 64), torch.randn(2, 40, 64)
    kernel = few.to(torch.bfloat16).float() @ dequantized.T
    assert ((layer(few) - kernel).abs() / kernel.abs().clamp(min=1)).max() <= 2 * INT8_KERNEL_BF16  # bf16 in, bf16 out
    torch.testing.assert_close(layer(many), many @ dequantized.T, rtol=1e-5, atol=1e-5)


SCHEMES = {  # name: (from_pretrained options, (mean, max, top-1) bounds; see tolerances.py)
    "int8": ({"quantize": "int8"}, (tol.INT8_MEAN_LOGIT_ERROR, tol.INT8_MAX_LOGIT_ERROR, tol.INT8_TOP1_AGREEMENT)),
    "int4": ({"quantize": "int4"}, (tol.INT4_MEAN_LOGIT_ERROR, tol.INT4_MAX_LOGIT_ERROR, tol.INT4_TOP1_AGREEMENT)),
    "kv-fp8": ({"kv_cache_dtype": "fp8"}, (tol.KV_FP8_MEAN_LOGIT_ERROR, tol.KV_FP8_MAX_LOGIT_ERROR, tol.KV_FP8_TOP1_AGREEMENT)),
    "kv-int8": ({"kv_cache_dtype": "int8"}, (tol.KV_INT8_MEAN_LOGIT_ERROR, tol.KV_INT8_MAX_LOGIT_ERROR, tol.KV_INT8_TOP1_AGREEMENT)),
}
STEPS = 256


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gpt_oss", "gemma3", "llama4"])
def test_quantized_models_stay_close_to_fp32(family: str, tmp_path) -> None:
    """Every scheme against the fp32 model over 256 greedy steps, decoded one token at a time through the cache
    (int8 / int4 decode kernels, quantized cache reads): logit error relative to each step's spread, top-1 agreement."""
    _check_schemes(family, tmp_path, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
def test_cuda_quantized_models_stay_close_to_fp32(family: str, tmp_path) -> None:
    """The same bounds on CUDA (dequantized products for the weights, fp8 / int8 caches on the GPU)."""
    _check_schemes(family, tmp_path, "cuda")


def _check_schemes(family: str, path, device: str) -> None:
    family_checkpoint(family, path)
    fp = DecoderLM.from_pretrained(path).to(device)
    path_tokens = generate(fp, [PROMPTS[0]], max_new_tokens=STEPS, stop_tokens=[]).tokens[0]
    want = decode_logits(fp, PROMPTS[0], path_tokens)
    failures = []
    for name, (options, (mean, worst, top1)) in SCHEMES.items():
        model = DecoderLM.from_pretrained(path, **options).to(device)
        if "quantize" in options:
            assert f"{options['quantize']} weights" in model.describe()
        else:
            assert model.new_cache(1, 8).layer(0).k.element_size() == 1  # the caches it builds are quantized
        got = agreement(fp, model, PROMPTS[0], STEPS, path_tokens, want)
        worst = tol.MOE_MAX_LOGIT_ERROR if family in ("gpt_oss", "llama4") else worst
        if not (got.steps == STEPS and 0 < got.mean_error <= mean and got.max_error <= worst and got.top1 >= top1):
            failures.append(f"{name}: {got}")
    assert not failures, failures


def test_quantize_errors(tmp_path) -> None:
    family_checkpoint("llama", tmp_path)
    with pytest.raises(ValueError, match="quantize='int2': pass None, 'int8' or 'int4'"):
        DecoderLM.from_pretrained(tmp_path, quantize="int2")
    with pytest.raises(ValueError, match="pick one"):
        DecoderLM.from_pretrained(tmp_path, quantize="int8", pack=True)
    with pytest.raises(ValueError, match="kv_cache_dtype='bf8' is unknown"):
        DecoderLM.from_pretrained(tmp_path, kv_cache_dtype="bf8")
    family_checkpoint("llama", tmp_path / "odd", intermediate_size=80)
    model = DecoderLM.from_pretrained(tmp_path / "odd")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"quantize='int4': layers.0.mlp.down_proj has 80 inputs, not a multiple of the int4 group size 32; use quantize='int8'"):
        model.quantize_weights("int4")
    assert model.quantized() is None and all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
    model = DecoderLM.from_pretrained(tmp_path, quantize="int8")
    with pytest.raises(ValueError, match="quantized already"):
        model.quantize_weights()


@torch.no_grad()
def test_lora_adds_its_full_precision_delta_on_int8_weights() -> None:
    """An adapter on a quantized layer adds exactly x A^T B^T (fp32) to the int8 product, row by row."""
    torch.manual_seed(1)
    layer = ColumnParallelLinear(64, 48, bias=False)
    lora_a = torch.cat([torch.randn(1, 4, 64), torch.zeros(1, 4, 64)])  # one adapter + the empty slot
    lora_b = torch.cat([torch.randn(1, 48, 4), torch.zeros(1, 48, 4)])
    layer.set_lora(lora_a, lora_b)
    layer.quantize_int8()
    x = torch.randn(2, 1, 64)
    base = layer(x, torch.tensor([-1, -1]))
    adapted = layer(x, torch.tensor([0, -1]))
    torch.testing.assert_close(adapted[0] - base[0], x[0] @ lora_a[0].T @ lora_b[0].T, rtol=1e-5, atol=1e-5)
    assert torch.equal(adapted[1], base[1])


def nxdi_int8_checkpoint(source, target) -> None:
    """`source`'s checkpoint with every projection as NxDI saves a per_channel_symmetric quantized model:
    int8 `.weight` codes and an fp32 `.scale` `[out, 1]` per row (embeddings, norms and lm_head stay float)."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    target.mkdir(parents=True)
    tensors = {}
    for name, t in load_file(source / "model.safetensors").items():
        if name.endswith("proj.weight"):
            scale = t.float().abs().amax(1, keepdim=True) / 127
            tensors[name] = torch.round(t.float() / scale).clamp(-127, 127).to(torch.int8)
            tensors[name[: -len("weight")] + "scale"] = scale
        else:
            tensors[name] = t
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(source / "config.json", target / "config.json")
    json.loads((target / "config.json").read_text())  # a plain HF config: NxDI keeps its quantization settings elsewhere


@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
def test_a_prequantized_int8_checkpoint_loads_as_its_codes(family: str, tmp_path) -> None:
    """NxDI's int8 checkpoint loads as an int8 model holding exactly the saved codes: the same codes, scales and
    tokens as quantizing the float checkpoint it came from."""
    family_checkpoint(family, tmp_path / "fp")
    nxdi_int8_checkpoint(tmp_path / "fp", tmp_path / "int8")
    loaded = DecoderLM.from_pretrained(tmp_path / "int8")
    quantized = DecoderLM.from_pretrained(tmp_path / "fp", quantize="int8")
    assert loaded.quantized() == "int8"
    codes = {k: v for k, v in loaded.state_dict().items() if k.endswith(("qweight", "qscale"))}
    want = {k: v for k, v in quantized.state_dict().items() if k.endswith(("qweight", "qscale"))}
    assert codes.keys() == want.keys() and len(codes) > 0
    assert all(torch.equal(codes[k], want[k]) for k in codes)  # the saved codes and scales, bit for bit
    assert generate(loaded, PROMPTS, max_new_tokens=12).tokens == generate(quantized, PROMPTS, max_new_tokens=12).tokens


def test_prequantized_checkpoints_refuse_what_they_cannot_be(tmp_path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    family_checkpoint("llama", tmp_path / "fp")
    nxdi_int8_checkpoint(tmp_path / "fp", tmp_path / "int8")
    with pytest.raises(ValueError, match=r"holds int8 weights with per-row scales: load it with quantize=None or 'int8' \(not 'int4'\)"):
        DecoderLM.from_pretrained(tmp_path / "int8", quantize="int4")
    tensors = load_file(tmp_path / "int8" / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.scale"] = tensors["model.layers.0.self_attn.q_proj.scale"][:1]  # per-tensor
    save_file(tensors, tmp_path / "int8" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"int8 weights need one scale per row \(\[out\] or \[out, 1\]\); got \['model.layers.0.self_attn.q_proj.scale: \[1, 1\]'\]"):
        DecoderLM.from_pretrained(tmp_path / "int8")
    del tensors["model.layers.0.self_attn.q_proj.scale"]  # codes without their scale
    save_file(tensors, tmp_path / "int8" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not floating point: \['model.layers.0.self_attn.q_proj.weight: I8'\]"):
        DecoderLM.from_pretrained(tmp_path / "int8")
    config = json.loads((tmp_path / "fp" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "fp" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized with quant_method='gptq'.*which distattn does not read"):
        DecoderLM.from_pretrained(tmp_path / "fp")


@pytest.mark.parametrize("kind", ["int8", "int4"])
@torch.no_grad()
def test_quantized_experts_run_their_dequantized_weights(kind: str, tmp_path) -> None:
    """MoE experts held in int8 / int4: each path (one expert's few rows through the kernel, many rows through a
    dequantized product, the gathered experts of a GPU decode step) computes with the dequantized weights."""
    from distattn.models.moe import ExpertsMLP
    from distattn.layers.quant import int4_dequantize

    family_checkpoint("gpt_oss", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, quantize=kind)
    moe = next(m for m in model.modules() if isinstance(m, ExpertsMLP))
    assert moe.weight_format == kind
    if kind == "int8":
        weights = {p: getattr(moe, f"{p}_codes").float() * getattr(moe, f"{p}_scale").float().unsqueeze(-1) for p in ("gate_up", "down")}
    else:
        weights = {p: int4_dequantize(getattr(moe, f"{p}_codes"), getattr(moe, f"{p}_scale_zero"), 32, torch.float32) for p in ("gate_up", "down")}
    reference = next(m for m in DecoderLM.from_pretrained(tmp_path).modules() if isinstance(m, ExpertsMLP))  # the same layer, float
    reference.gate_up.copy_(weights["gate_up"])  # holding the dequantized weights
    reference.down.copy_(weights["down"])
    torch.manual_seed(0)
    for rows in (3, 40):  # a decode step's few rows, then a prefill's many
        x = torch.randn(rows, moe.gate_up.shape[-1])
        ids, scores = moe.route(x)
        for gather in (False, True):
            got = moe.run_experts(x, ids, scores, scale_input=False, gather=gather)
            want = reference.run_experts(x, ids, scores, scale_input=False, gather=gather)
            bf16 = not gather  # an expert given <= 16 rows uses the kernel, in prefill too
            # bf16 activations and outputs on the kernel path (two products, each rounded to 2^-8); fp32 otherwise
            torch.testing.assert_close(got, want, rtol=4 * INT8_KERNEL_BF16 if bf16 else 1e-5, atol=4 * INT8_KERNEL_BF16 if bf16 else 1e-5)
