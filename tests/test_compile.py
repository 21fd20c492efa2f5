"""A compiled decode step (`DecoderLM.compile_decode`) generates HF's greedy tokens, across batch
sizes and cache lengths (its graph turns shape-generic instead of recompiling per call)."""

from __future__ import annotations

import torch
from torch import _dynamo

from distattn.models import DecoderLM, generate

from test_models import family_checkpoint


def _hf_greedy(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    return [hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def test_compiled_decode_generates_hf_tokens_for_any_batch_and_length(tmp_path) -> None:
    hf = family_checkpoint("llama", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)  # fp64 on both sides: no argmax ties
    model.compile_decode()
    _dynamo.reset()
    frames = _dynamo.utils.counters["stats"]
    calls = [
        ([[5, 17, 3, 44, 9, 1, 30], [7, 7, 21, 90]], 6),  # rows of different lengths (padding in prefill)
        ([[5, 17, 3, 44, 9, 1, 30], [7, 7, 21, 90]], 14),  # another cache length
        ([[33, 2, 5], [9, 9, 9, 9, 1], [60, 4, 4, 8]], 10),  # another batch size
        ([[1, 2, 3, 4], [8, 7, 6, 5], [3, 3, 3]], 17),  # both again: no new graph
    ]
    compiled_before_last = None
    for i, (prompts, new) in enumerate(calls):
        if i == len(calls) - 1:
            compiled_before_last = frames["unique_graphs"]
        assert generate(model, prompts, max_new_tokens=new).tokens == _hf_greedy(hf, prompts, new)
    assert compiled_before_last >= 2  # the steps did run compiled: a static graph, then a generic one
    assert frames["unique_graphs"] == compiled_before_last  # the generic graph served the last call
    model.compile_decode(False)
    assert generate(model, calls[0][0], max_new_tokens=4).tokens == _hf_greedy(hf, calls[0][0], 4)


def test_compiled_decode_runs_quantized_weights_and_caches(tmp_path) -> None:
    """int8 / int4 weights (their kernels called from the graph) and an int8 KV cache: the compiled step gives the
    eager step's tokens, and did compile (graphs were made)."""
    prompts = [[5, 17, 3, 44, 9, 1, 30], [7, 7, 21, 90]]
    # gpt-oss: experts, sinks and a rolling cache too
    for family, options in (("gpt_oss", {"quantize": "int8", "kv_cache_dtype": "int8"}), ("llama", {"quantize": "int4"})):
        family_checkpoint(family, tmp_path / family)
        model = DecoderLM.from_pretrained(tmp_path / family, **options)
        eager = generate(model, prompts, max_new_tokens=12).tokens
        _dynamo.reset()
        model.compile_decode()
        assert generate(model, prompts, max_new_tokens=12).tokens == eager, options
        assert _dynamo.utils.counters["stats"]["unique_graphs"] >= 1
