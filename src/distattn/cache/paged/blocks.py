"""Block ids of one layer kind: the pool (reference counts, free list, prefix hashes) and the group
(block tables shared by the layers of one kind)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import torch


class BlockStorage(Protocol):
    """A layer's storage of a group's blocks (`PagedLayerCache`)."""

    def clear_block(self, block: int) -> None: ...

    def copy_block(self, source: int, target: int, keep_below: int) -> None: ...


class PoolExhausted(ValueError):
    """reserve / add_sequence needs more free blocks than the pool has."""


class BlockPool:
    """Block ids of one layer kind: reference counts, a least-recently-released free list, prefix hashes."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}

    def allocate(self) -> int:
        """A block with no content: the least recently released; its prefix hash is forgotten."""
        block, _ = self.free.popitem(last=False)
        stale = self.hash_of.pop(block, None)
        if stale is not None:
            del self.block_of[stale]
        self.refs[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """One more holder of `block` (a cached free block comes back into use)."""
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """One holder fewer; at zero the block is free (least recently released reused first)."""
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None  # still cached under its hash until reallocated

    def register(self, block: int, key: bytes) -> None:
        """Record `block` in the prefix cache under digest `key` (the first block for a digest stays)."""
        if key not in self.block_of and block not in self.hash_of:
            self.block_of[key], self.hash_of[block] = block, key

    def lookup(self, key: bytes) -> int | None:
        """The cached block with digest `key`, in use or free, or None."""
        return self.block_of.get(key)

    @property
    def in_use(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - len(self.free)


class BlockGroup:
    """Layers of one kind sharing block tables: full attention, a sliding window, or chunks."""

    def __init__(self, kind: str, limit: int | None, num_blocks: int, block_size: int) -> None:
        self.kind, self.limit, self.block_size = kind, limit, block_size
        self.pool = BlockPool(num_blocks)
        self.null = num_blocks  # the always-empty block
        self.tables: dict[int, list[int | None]] = {}
        self.layers: list[BlockStorage] = []
        self.version = 0  # bumped by every change of tables or reference counts
        self._memo: dict[tuple, torch.Tensor] = {}  # tensors derived from the tables, for this version

    def first_needed(self, position: int) -> int:
        """The oldest key position a query at `position` or later can see."""
        if self.limit is None:  # full attention
            return 0
        if self.kind == "window":
            return max(0, position - self.limit + 1)
        return position // self.limit * self.limit  # chunks

    def changed(self) -> None:
        """Forget the tensors derived from the tables (call after any change of tables or counts)."""
        self.version += 1
        self._memo.clear()

    def table_tensor(self, rows: Sequence[int], device: torch.device) -> torch.Tensor:
        """Block ids `[len(rows), n]` of rows' tables, empty entries -> the null block (n >= 1).

        Built once per step: every layer of the group reads, checks and writes the same tables.
        """
        key = ("tables", tuple(rows), device)
        if key not in self._memo:
            tables = [self.tables.get(r, []) for r in rows]
            width = max([1] + [len(t) for t in tables])
            out = [[self.null if b is None else b for b in t] + [self.null] * (width - len(t)) for t in tables]
            self._memo[key] = torch.tensor(out, dtype=torch.long, device=device)
        return self._memo[key]

    def ref_tensor(self, device: torch.device) -> torch.Tensor:
        """Reference count of every block `[num_blocks + 1]` (the null block: 0)."""
        key = ("refs", device)
        if key not in self._memo:
            self._memo[key] = torch.tensor(self.pool.refs + [0], device=device)
        return self._memo[key]

    def clear_block(self, block: int) -> None:
        """Empty every slot of `block` in every layer of the group: no position, zero K / V (nothing
        of the sequence that held it before, non-finite values included, reaches the next)."""
        for layer in self.layers:
            layer.clear_block(block)

    def copy_block(self, source: int, target: int, keep_below: int) -> None:
        """Copy a block's K/V in every layer of the group; positions >= keep_below become empty."""
        for layer in self.layers:
            layer.copy_block(source, target, keep_below)
