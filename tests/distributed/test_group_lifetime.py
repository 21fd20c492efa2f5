"""torch.distributed owns the process groups: destroy_process_group frees every group a model used (and
joins its communication threads) while the model lives on, and the model then says why it cannot run."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distattn import AttentionConfig, NeuronAttentionBase
from distattn.parallel import ParallelGroups
from distributed.harness import run_workers

CFG = AttentionConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _join(folder: str, name: str, rank: int, world_size: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/{name}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))


def _lifetime_worker(rank: int, world_size: int) -> None:
    box = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(box)  # a rendezvous folder both ranks know
    folder = str(box[0])
    dist.destroy_process_group()  # start from no world at all
    x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
    NeuronAttentionBase(CFG)(x)  # one process first: lazily started pools are running before the count
    base = _threads()

    _join(folder, "first", rank, world_size)
    groups = ParallelGroups.shared(world_size, cp_degree=2, dp_degree=2)
    torch.manual_seed(1)
    attn = NeuronAttentionBase(CFG, groups=groups)
    first = attn(x)[0]
    assert _threads() > base  # each group's gloo threads
    dist.destroy_process_group()
    assert _threads() <= base, "a process group outlived destroy_process_group"
    with pytest.raises(RuntimeError, match="its process group was destroyed .*build the model again after init_process_group"):
        attn(x)

    _join(folder, "second", rank, world_size)  # a new world: shared() builds new groups, not the dead ones
    again = ParallelGroups.shared(world_size, cp_degree=2, dp_degree=2)
    assert again is not groups
    torch.manual_seed(1)
    assert torch.equal(NeuronAttentionBase(CFG, groups=again)(x)[0], first)  # same weights, working collectives


def test_destroying_the_world_frees_every_group_a_live_model_used(tmp_path: Path) -> None:
    run_workers(_lifetime_worker, 2, tmp_path, timeout_s=120)
