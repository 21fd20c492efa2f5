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
