"""ParallelGroups: the process groups one attention layer uses, passed in explicitly.

Over a tensor-parallel world of `tp` ranks (NxDI's layout):

- context parallel (cp): attention-TP groups of `tp / cp` consecutive ranks each
  split the heads while the `cp` ranks of a strided CP group split the prompt; e.g.
  tp=8, cp=4: attention-TP [[0,1],[2,3],[4,5],[6,7]], CP [[0,2,4,6],[1,3,5,7]].
- data parallel decode (dp): DP replicas of `tp / dp` consecutive ranks each serve a
  slice of the batch; the strided DP group joins the ranks that hold the same heads
  in different replicas.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch.distributed as dist

from .comm import Group, HeldWeakly, group_rank, group_size


def attention_group_ranks(tp: int, degree: int) -> tuple[list[list[int]], list[list[int]]]:
    """(attention-TP groups, cross groups) for cp or dp = `degree` over `tp` ranks.

    Attention-TP groups are blocks of tp / degree consecutive ranks; a cross group
    holds the ranks at the same place in every block (stride tp / degree).
    """
    if degree <= 0 or tp % degree:
        raise ValueError(f"degree {degree} must divide the tensor-parallel size {tp}")
    width = tp // degree
    blocks = [list(range(b * width, (b + 1) * width)) for b in range(degree)]
    cross = [list(range(j, tp, width)) for j in range(width)]
    return blocks, cross


def global_ranks(group: Group) -> list[int]:
    """The global ranks of a group's members ([this rank] for None)."""
    if group is None:
        return [dist.get_rank()] if dist.is_available() and dist.is_initialized() else [0]
    return dist.get_process_group_ranks(group)


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups for tensor (tp), context (cp) and data (dp) parallel attention.

    `ParallelGroups()` is one process: no torch.distributed needed. Build the rest
    with `from_world`, or pass groups with the layout described in this module.
    """

    # each held weakly (torch.distributed owns its groups: see HeldWeakly)
    tp: HeldWeakly = HeldWeakly()  # every rank of the model; heads are sharded over it
    cp: HeldWeakly = HeldWeakly()  # the ranks that split one prompt during prefill (strided)
    cp_tp: HeldWeakly = HeldWeakly()  # this rank's attention-TP group during CP prefill (consecutive)
    dp: HeldWeakly = HeldWeakly()  # the ranks holding the same heads in different DP replicas (strided)
    dp_tp: HeldWeakly = HeldWeakly()  # this rank's DP replica: its attention-TP group during decode

    def __post_init__(self) -> None:
        for cross, inner, name in ((self.cp, self.cp_tp, "cp"), (self.dp, self.dp_tp, "dp")):
            if cross is None and inner is None:
                continue  # degree 1: the stage runs over the whole tp group
            if group_size(cross) * group_size(inner) != self.tp_size:
                raise ValueError(
                    f"{name} ({group_size(cross)} ranks) x {name}_tp ({group_size(inner)} ranks) must equal tp "
                    f"({self.tp_size} ranks); build the groups with ParallelGroups.from_world"
                )

    @property
    def tp_size(self) -> int:
        return group_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return group_rank(self.tp)

    @property
    def cp_size(self) -> int:
        return group_size(self.cp)

    @property
    def cp_rank(self) -> int:
        return group_rank(self.cp)

    @property
    def dp_size(self) -> int:
        return group_size(self.dp)

    @property
    def dp_rank(self) -> int:
        """Which DP replica this rank belongs to."""
        return group_rank(self.dp)

    def tp_ranks_of(self, group: Group) -> list[int]:
        """The tp ranks of a group's members, in the group's rank order."""
        if group is None:
            return [self.tp_rank]
        members = dist.get_process_group_ranks(group)
        if self.tp is None:
            return members
        return [dist.get_group_rank(self.tp, m) for m in members]

    @property
    def tp_global_ranks(self) -> list[int]:
        """The global ranks of this rank's tp group (just this process when there is none)."""
        return global_ranks(self.tp)

    @classmethod
    def shared(cls, tp_degree: int, *, cp_degree: int = 1, dp_degree: int = 1) -> ParallelGroups:
        """`from_world(tp_degree, cp_degree=, dp_degree=)`, built once per process and degrees.

        For model code that, as NxDI's, names parallel degrees instead of passing groups:
        every layer of a model then shares one set of groups. Collective on first use.
        """
        world, key = dist.group.WORLD, (tp_degree, cp_degree, dp_degree)
        built = _SHARED.get(key)
        if built is None or built[0]() is not world:  # none yet, or built in a world since destroyed
            groups = cls.from_world(tp_degree, cp_degree=cp_degree, dp_degree=dp_degree)  # refuses without a world
            assert world is not None  # from_world found one
            built = _SHARED[key] = (weakref.ref(world), groups)
        return built[1]

    @classmethod
    def from_world(cls, tp_degree: int | None = None, *, cp_degree: int = 1, dp_degree: int = 1) -> ParallelGroups:
        """Groups over the default process group (e.g. started by torchrun).

        tp_degree: ranks per model (default: the world); consecutive ranks form a model.
        cp_degree: context-parallel prefill degree (divides tp_degree).
        dp_degree: data-parallel decode degree (divides tp_degree).
        Every process must call this (creating groups is collective).
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
        for name, degree in (("cp_degree", cp_degree), ("dp_degree", dp_degree)):
            if not isinstance(degree, int) or degree <= 0 or tp_degree % degree:
                raise ValueError(f"{name}={degree!r} must be a positive divisor of tp_degree={tp_degree}")
        def mine(rank_lists: list[list[int]], size: int) -> Group:
            found = None
            for ranks in rank_lists:  # every process creates every group, in the same order
                group = dist.new_group(ranks) if size > 1 else None
                if rank in ranks:
                    found = group
            return found

        tp = mine([list(range(s, s + tp_degree)) for s in range(0, world, tp_degree)], tp_degree)
        fields = {"tp": tp}
        for name, degree in (("cp", cp_degree), ("dp", dp_degree)):
            if degree == 1:
                continue
            blocks, cross = [], []
            for start in range(0, world, tp_degree):
                b, c = attention_group_ranks(tp_degree, degree)
                blocks += [[start + r for r in ranks] for ranks in b]
                cross += [[start + r for r in ranks] for ranks in c]
            fields[name] = mine(cross, degree)
            fields[f"{name}_tp"] = mine(blocks, tp_degree // degree)
        return cls(**fields)


# (tp, cp, dp) degrees -> (the world they were built in, held weakly; the groups)
_SHARED: dict[tuple[int, int, int], tuple[weakref.ref[dist.ProcessGroup], ParallelGroups]] = {}
