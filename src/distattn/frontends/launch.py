"""Starting the processes a command runs in, and loading its model: the frontends' one path to both.

`relaunch(tp)` runs the same command again under torchrun; inside, `start_world` joins the
process world through `distattn.parallel.comm` (the only caller of torch.distributed) and
builds the groups; `load_model` reads the checkpoint (and LoRA adapters) as every command does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..layers.lora import LoraAdapter
from ..models.decoder import DecoderLM
from ..parallel.comm import init_world, shutdown_world, world_rank
from ..parallel.groups import ParallelGroups


def relaunch(tp: int, *, grace_s: float = 5.0) -> int:
    """This command again under torchrun with `tp` processes on this machine; its exit status.

    torchrun and its workers run in a process group of their own: SIGTERM or SIGINT to this command
    (what systemd, Docker and Kubernetes send) reaches every one of them, and whatever has not exited
    `grace_s` seconds later is killed, so no worker outlives the command (holding its port and memory)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), "-m", "distattn.cli", *sys.argv[1:]]
    child = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE, text=True, errors="replace")
    stderr = ErrorFilter(child)

    def forward(signum: int, _frame: object) -> None:
        _signal_group(child, signum)
        raise SystemExit(128 + signum)  # stop waiting: the grace period below bounds the shutdown

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = child.wait()
        stderr.join()
        return 2 if stderr.refused else status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # interrupted: give the group its grace period, then kill what is left
            _signal_group(child, signal.SIGTERM)
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(child, signal.SIGKILL)  # workers that outlived torchrun itself


class ErrorFilter(threading.Thread):
    """Forwards torchrun's stderr (its workers' too) line by line. Once a worker refuses the command
    (`distattn: error: ...`, exit status 2), the message is shown once (every rank refuses alike) and
    what follows, torchrun's report of a failed worker with its traceback, is not: the user sees one
    clean message, and the command exits 2."""

    def __init__(self, child: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.child, self.refused = child, False
        self.start()

    def run(self) -> None:
        assert self.child.stderr is not None  # opened as a pipe
        for line in self.child.stderr:
            if not self.refused:  # up to and including the first refusal
                self.refused = line.startswith("distattn: error: ")
                sys.stderr.write(line)
                sys.stderr.flush()


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:  # the group has exited
        pass


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
