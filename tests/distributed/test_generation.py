"""Greedy generation with tensor parallelism, CP prefill and DP decode equals HF generate."""

from __future__ import annotations

import functools

import pytest
import torch

from distributed.harness import run_workers
from test_models import NEW_TOKENS, family_checkpoint

PROMPTS = [[5, 17, 3, 44, 9, 1, 30, 2, 8, 61, 12], [7, 7, 21, 90], [33, 2, 5, 80, 14, 6, 3], [4, 50, 9]]  # 4 rows: dp 2 splits them


def _generate(rank: int, world_size: int, checkpoint: str, expected: list[list[int]], degrees: tuple[int, int]) -> None:
    from distattn.models import DecoderLM, generate_greedy
    from distattn.parallel import ParallelGroups

    cp, dp = degrees
    groups = ParallelGroups.from_world(cp_degree=cp, dp_degree=dp)
    model = DecoderLM.from_pretrained(checkpoint, groups=groups, dtype=torch.float64)
    got = generate_greedy(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    if got != expected:
        raise AssertionError(f"tp={groups.tp_size} cp={cp} dp={dp}: {got} != {expected}")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_parallel_generation_matches_hf(family: str, tmp_path) -> None:
    hf = family_checkpoint(family, tmp_path / "ckpt")
    expected = []
    for prompt in PROMPTS:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    for degrees in [(1, 1), (2, 2)]:  # tp 2; then cp 2 prefill and dp 2 decode over the same 2 ranks
        run_workers(functools.partial(_generate, checkpoint=str(tmp_path / "ckpt"), expected=expected, degrees=degrees), 2, tmp_path)
