"""The collectives distattn uses, and nothing else calls torch.distributed collectives.

Each takes a process group; `None` or a group of one process is the identity, so
single-process code never needs `init_process_group`.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import TypeVar, overload

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None
T = TypeVar("T")


class HeldWeakly:
    """A process-group attribute (of a module, of ParallelGroups) held by weak reference.

    torch.distributed's registry owns every group (`new_group` registers it); distattn's objects only
    refer to them. So `destroy_process_group()` frees the groups, and joins their communication
    threads, while the interpreter is alive, however long a model that used them lives. (A gloo
    thread still releasing its last collective's tensors when the interpreter finalizes needs the
    GIL it can no longer take, and the process aborts: "terminate called without an active exception".)
    Using a module after that is a RuntimeError that says so. None (one process) is held as None.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot, self.name = f"_weak_{name}", name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> None: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> Group: ...
    def __get__(self, instance: object | None, owner: type | None = None) -> Group:
        if instance is None:  # the class attribute: a dataclass field's default
            return None
        ref = instance.__dict__.get(self.slot)
        if ref is None:
            return None
        group = ref()
        if group is None:
            raise RuntimeError(
                f"{type(instance).__name__}.{self.name}: its process group was destroyed "
                "(torch.distributed.destroy_process_group); build the model again after init_process_group"
            )
        return group

    def __set__(self, instance: object, group: Group) -> None:
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{type(instance).__name__}.{self.name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
        instance.__dict__[self.slot] = None if group is None else weakref.ref(group)


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over the group, in place; returns the tensor."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Element-wise maximum over the group, in place; returns the tensor."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_reduce_min(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Element-wise minimum over the group, in place; returns the tensor."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group: Group) -> list[torch.Tensor]:
    """Every rank's tensor (same shape on all ranks), in group-rank order."""
    if group_size(group) == 1:
        return [tensor]
    parts = [torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device) for _ in range(group_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def all_gather_last_dim(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's tensor along the last dim."""
    return torch.cat(all_gather(tensor, group), dim=-1)


def ring_shift(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    """Send `tensor` to the next rank of the group and return the previous rank's."""
    size = group_size(group)
    if size == 1:
        return tensor
    assert group is not None  # a group of one returned above
    rank = group_rank(group)
    received = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), dist.get_global_rank(group, (rank + 1) % size), group),
        dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size), group),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def check_same(description: str, group: Group, what: str) -> None:
    """ValueError on every rank unless every rank of the group passes the same description."""
    if group_size(group) == 1:
        return
    digest = torch.tensor(list(hashlib.sha256(description.encode()).digest()), dtype=torch.int64)
    parts = all_gather(digest, group)
    differ = [rank for rank, part in enumerate(parts) if not torch.equal(part, parts[0])]
    if differ:
        raise ValueError(
            f"{what} differ across ranks: group ranks {differ} disagree with group rank 0 "
            f"(this rank has {description}); build every rank with the same arguments"
        )


# ---- the process world (frontends start and stop it here, nowhere else) ----


def init_world(backend: str, timeout_s: float = 300.0) -> None:
    """Join the process world a launcher (torchrun) set up in the environment; it is left at exit
    at the latest (while the interpreter is alive: see HeldWeakly), whatever path the command ends by."""
    import atexit
    from datetime import timedelta

    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown_world)


def world_rank() -> int:
    """This process's rank in the world (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shutdown_world() -> None:
    """Leave the process world, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` of world rank `src` on every rank (picklable objects)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_zeros(obj: T) -> T:
    """World rank 0's `obj` on every rank of a process world; `obj` itself without one (a seed drawn
    per rank that every rank must share)."""
    return broadcast_object(obj) if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else obj
