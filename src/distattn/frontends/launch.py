"""Starting the processes a command runs in, and loading its model: the frontends' one path to both.

`relaunch(tp)` runs the same command again under torchrun; inside, `start_world` joins the
process world through `distattn.parallel.comm` (the only caller of torch.distributed) and
builds the groups; `load_model` reads the checkpoint (and LoRA adapters) as every command does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..layers.lora import LoraAdapter
from ..models.decoder import DecoderLM
from ..parallel.comm import init_world, shutdown_world, world_rank
from ..parallel.groups import ParallelGroups


def relaunch(tp: int) -> int:
    """This command again under torchrun with `tp` processes on this machine; its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), "-m", "distattn.cli", *sys.argv[1:]]
    return subprocess.call(command)


@dataclass(frozen=True)
class World:
    """Where this process runs: its groups, its world rank, its device."""

    groups: ParallelGroups
    rank: int
    device: torch.device

    def stop(self) -> None:
        shutdown_world()


def start_world(tp: int, device: str, *, cp: int = 1, dp: int = 1, backend: str | None = None) -> World:
    """One process (tp 1), or this rank of a torchrun world of `tp` processes (nccl on CUDA, else gloo)."""
    where = torch.device(device)
    if tp == 1:
        return World(ParallelGroups(), 0, where)
    init_world(backend or ("nccl" if where.type == "cuda" else "gloo"))
    if where.type == "cuda":
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return World(ParallelGroups.from_world(cp_degree=cp, dp_degree=dp), world_rank(), where)


def load_model(
    checkpoint: str, world: World, dtype: torch.dtype, *, adapters: Sequence[LoraAdapter | str] = (), **options: Any
) -> DecoderLM:
    """The checkpoint as this rank's `DecoderLM` on the world's device, with its LoRA adapters loaded
    (`options`: `DecoderLM.from_pretrained`'s pack, quantize, kv_cache_dtype)."""
    model = DecoderLM.from_pretrained(checkpoint, groups=world.groups, dtype=dtype, **options).to(world.device)
    if adapters:
        model.load_lora_adapters(list(adapters))
    return model
