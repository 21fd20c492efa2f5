"""Tensor parallelism across processes (gloo on CPU) equals one process."""

from __future__ import annotations

import time

import pytest

from distributed.harness import run_workers
from distributed.tp_checks import CASES, tp_worker


def test_tensor_parallel_equals_one_process(tmp_path) -> None:
    """tp 1, 2, 4 x every case: prefill, decode and speculative outputs, and gathered KV caches."""
    assert {c.n_kv_heads for c in CASES} >= {1, 2, 4, 8}
    assert any(c.n_heads % 4 for c in CASES)  # padded q heads at tp 4
    run_workers(tp_worker, 4, tmp_path)


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("position_ids: bad input on this rank")
    dist.all_reduce(torch.ones(1))  # the other ranks wait here for rank 1


def test_a_failing_rank_fails_the_run_quickly(tmp_path) -> None:
    start = time.monotonic()
    with pytest.raises(Exception, match="^rank 1 of 2 failed: ValueError: position_ids: bad input on this rank"):
        run_workers(_raise_on_rank_one, 2, tmp_path, timeout_s=120)
    assert time.monotonic() - start < 90  # bounded: the others fail in their collective, or spawn ends them
