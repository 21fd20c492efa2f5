"""Faults on one rank end every rank with a clear error, in bounded time."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from distattn import AttentionConfig, NeuronAttentionBase
from distattn.parallel import ParallelGroups
from distributed.harness import run_workers
from distributed.test_torchrun import ROOT, torchrun

CFG = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)


def _killed_mid_forward(rank: int, world_size: int) -> None:
    attn = NeuronAttentionBase(AttentionConfig(**CFG), groups=ParallelGroups.from_world())
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    attn(torch.randn(1, 4, 32))  # rank 0 waits in o_proj's all-reduce for the dead rank


def _aborted_in_a_function(rank: int, world_size: int) -> None:
    attn = NeuronAttentionBase(AttentionConfig(**CFG), groups=ParallelGroups.from_world())
    if rank == 1:
        _abort_here()  # as a C++ std::terminate would
    attn(torch.randn(1, 4, 32))


def _abort_here() -> None:
    os.abort()


def _different_configs(rank: int, world_size: int) -> None:
    window = 8 if rank == 0 else 16  # a launch script that built rank 1 differently
    NeuronAttentionBase(AttentionConfig(**CFG, sliding_window=window), groups=ParallelGroups.from_world())


def test_a_killed_rank_ends_the_run(tmp_path) -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="^rank 1 of 2 was killed by signal SIGKILL"):
        run_workers(_killed_mid_forward, 2, tmp_path, timeout_s=120)
    assert time.monotonic() - start < 90


def test_a_rank_killed_by_a_signal_says_where_it_was(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="^rank 1 of 2 was killed by signal SIGABRT") as failure:
        run_workers(_aborted_in_a_function, 2, tmp_path, timeout_s=120)
    message = str(failure.value)
    assert "rank1.fault:" in message and "Fatal Python error: Aborted" in message
    assert '_abort_here' in message and "_aborted_in_a_function" in message  # its Python stack, innermost first


def test_ranks_built_differently_all_fail_at_construction(tmp_path) -> None:
    with pytest.raises(RuntimeError) as failure:
        run_workers(_different_configs, 2, tmp_path, timeout_s=120)
    message = str(failure.value)
    for rank in (0, 1):  # every rank, not just the odd one, stops with the same explanation
        assert f"rank {rank} of 2 failed: ValueError: NeuronAttentionBase settings differ across ranks: group ranks [1] disagree with group rank 0" in message
    assert "build every rank with the same arguments" in message


def test_a_killed_rank_under_torchrun(tmp_path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, torch, torch.distributed as dist\n"
        "from datetime import timedelta\n"
        "import distattn\n"
        "from distattn.parallel import ParallelGroups\n"
        "dist.init_process_group('gloo', timeout=timedelta(seconds=30))\n"
        "attn = distattn.NeuronAttentionBase(distattn.AttentionConfig(hidden_size=32, num_attention_heads=4), groups=ParallelGroups.from_world())\n"
        "if dist.get_rank() == 1:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "attn(torch.randn(1, 4, 32))\n"
    )
    start = time.monotonic()
    done = torchrun(script, 2, timeout=120)
    assert done.returncode != 0
    assert "Signal 9 (SIGKILL)" in done.stderr or "exitcode  : -9" in done.stderr, done.stderr[-2000:]
    assert time.monotonic() - start < 60
