"""Parity with Hugging Face attention modules: prefill, 20 decode steps, a 4-token speculative step.

Each family's tiny HF model (random weights) runs once over each whole sequence;
our modules, loaded from HF's attention state dicts, run the same tokens
incrementally over a KVCacheManager, batched, with prompts of different lengths
(longer than the window and the chunk, so decode crosses their boundaries and
the rolling caches wrap around).
"""

from __future__ import annotations

import pytest
import torch

from distattn import KVCacheManager, NeuronAttentionBase
from distattn.hf import attention_config_from_hf
from distattn.kernels import available_backends, get_backend

from hf_reference import FAMILIES, attention_layers, build_model, trace
from tolerances import BF16_VS_FP32, FP32_VS_HF

PROMPTS = (13, 9)  # both longer than WINDOW and CHUNK (8)
DECODE_STEPS = 20
SPEC_WIDTH = 4

# backends that return the log-sum-exp run every stage (flex serves prefill only: tests/test_flex.py)
LSE_BACKENDS = [n for n in available_backends() if not getattr(get_backend(n), "fuses_sinks", False)]


def _sequences(vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, n + DECODE_STEPS + SPEC_WIDTH), generator=gen) for n in PROMPTS]


def _build_ours(model, *, kernel: str, fused: bool, dtype: torch.dtype) -> list[NeuronAttentionBase]:
    modules = []
    for i, attn in enumerate(attention_layers(model)):
        cfg = attention_config_from_hf(model.config, i)
        cfg = type(cfg)(**{**cfg.__dict__, "fused_qkv": fused})
        ours = NeuronAttentionBase(cfg, kernel=kernel, layer_idx=i)
        ours.load_hf_state_dict(attn.state_dict())
        modules.append(ours.to(dtype))
    return modules


def run_incremental(
    modules: list[NeuronAttentionBase], inputs: list[list[torch.Tensor]], dtype: torch.dtype, layer_kwargs: list[dict] | None = None
) -> list[list[torch.Tensor]]:
    """Drive every layer through prefill, decode and one speculative step, batched.

    Args:
        inputs: inputs[b][layer] is `[1, T_b, hidden]` (HF's attention input for sequence b).
        layer_kwargs: extra forward keywords per layer (what an NxDI decoder layer passes).

    Returns:
        outputs[b][layer] `[T_b, hidden]`, our output at every position of sequence b.
    """
    batch = len(PROMPTS)
    hidden = inputs[0][0].shape[-1]
    mgr = KVCacheManager.for_modules(modules, max_batch_size=batch, max_seq_len=64)
    layer_kwargs = layer_kwargs or [{} for _ in modules]
    results = [[[] for _ in modules] for _ in range(batch)]

    def step(offsets: list[int], width: list[int], mask: bool) -> None:
        seq = max(width)
        positions = torch.zeros(batch, seq, dtype=torch.long)
        valid = torch.zeros(batch, seq, dtype=torch.bool)
        for b in range(batch):
            positions[b] = torch.arange(offsets[b], offsets[b] + seq)
            valid[b, : width[b]] = True
        for i, module in enumerate(modules):
            x = torch.zeros(batch, seq, hidden, dtype=dtype)
            for b in range(batch):
                x[b, : width[b]] = inputs[b][i][0, offsets[b] : offsets[b] + width[b]].to(dtype)
            out = module(x, attention_mask=valid if mask else None, position_ids=positions, kv_mgr=mgr, idx=i, **layer_kwargs[i])
            for b in range(batch):
                results[b][i].append(out.hidden_states[b, : width[b]])

    step([0] * batch, list(PROMPTS), mask=True)  # prefill, right-padded
    for j in range(DECODE_STEPS):
        step([n + j for n in PROMPTS], [1] * batch, mask=False)
    step([n + DECODE_STEPS for n in PROMPTS], [SPEC_WIDTH] * batch, mask=False)  # speculation
    return [[torch.cat(parts) for parts in per_layer] for per_layer in results]


def _max_error(family: str, kernel: str, fused: bool, dtype: torch.dtype) -> tuple[float, float]:
    model = build_model(family)
    seqs = _sequences(model.config.get_text_config().vocab_size, seed=1)
    traces = [trace(model, ids) for ids in seqs]
    modules = _build_ours(model, kernel=kernel, fused=fused, dtype=dtype)
    ours = run_incremental(modules, [t.inputs for t in traces], dtype)
    err, scale = 0.0, 0.0
    for b, t in enumerate(traces):
        for i, ref in enumerate(t.outputs):
            err = max(err, (ours[b][i].double() - ref[0].double()).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    return err, scale


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("kernel", LSE_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_hf(family: str, kernel: str, fused: bool) -> None:
    err, scale = _max_error(family, kernel, fused, torch.float32)
    assert scale > 0.5, "outputs too small for the comparison to mean anything"
    assert err <= FP32_VS_HF, f"{family}/{kernel}: max abs diff {err:.3g}"


@pytest.mark.parametrize("kernel", LSE_BACKENDS)
@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "qwen3"])
def test_bf16_close_to_hf_fp32(family: str, kernel: str) -> None:
    err, scale = _max_error(family, kernel, False, torch.bfloat16)
    assert err <= BF16_VS_FP32 * max(scale, 1.0), f"{family}/{kernel}: bf16 max abs diff {err:.3g} (scale {scale:.3g})"
