"""ParallelGroups: the process groups one attention layer uses, passed in explicitly."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .comm import Group, group_rank, group_size


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups for tensor (tp), context (cp) and data (dp) parallel attention.

    `ParallelGroups()` is one process: no torch.distributed needed.
    """

    tp: Group = None  # heads are sharded across this group

    @property
    def tp_size(self) -> int:
        return group_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return group_rank(self.tp)

    @classmethod
    def from_world(cls, tp_degree: int | None = None) -> ParallelGroups:
        """Groups over the default process group (e.g. started by torchrun).

        Consecutive ranks form a tp group: tp_degree=2 on 4 processes gives [0, 1] and
        [2, 3]. Every process must call this (new_group is collective).
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ParallelGroups.from_world needs torch.distributed initialised: call "
                "torch.distributed.init_process_group() first (torchrun sets the environment), "
                "or use ParallelGroups() for one process"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        tp_degree = world if tp_degree is None else tp_degree
        if not isinstance(tp_degree, int) or tp_degree <= 0 or world % tp_degree:
            raise ValueError(f"tp_degree={tp_degree!r} must be a positive divisor of the world size {world}")
        if tp_degree == world:
            return cls(tp=dist.group.WORLD if world > 1 else None)
        mine = None
        for start in range(0, world, tp_degree):
            group = dist.new_group(list(range(start, start + tp_degree)))
            if start <= rank < start + tp_degree:
                mine = group
        return cls(tp=mine if tp_degree > 1 else None)
