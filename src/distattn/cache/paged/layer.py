"""One layer's paged cache: the block pools' K, V and positions, read and written through block tables."""

from __future__ import annotations

import torch

from ..store import KVStore
from .blocks import BlockGroup


class PagedLayerCache(KVStore):
    """One layer's view of the paged cache (the interface attention uses, like LayerKVCache)."""

    paged = True

    def geometry(self) -> tuple[str, BlockGroup]:
        """Layers of one block group share a write plan."""
        return ("paged", self.group)

    def clear_block(self, block: int) -> None:
        """Empty every slot of `block`: no position, zero K / V."""
        self.positions[block] = -1
        self.zero(block)

    def copy_block(self, source: int, target: int, keep_below: int) -> None:
        """Copy a block's K/V; positions >= keep_below become empty."""
        dropped = self.positions[source] >= keep_below  # [block_size]: slots the copy leaves empty
        self.copy_entry(source, target, ~dropped)
        self.positions[target] = self.positions[source].masked_fill(dropped, -1)

    def __init__(self, group: BlockGroup, *, n_kv_heads: int, head_dim: int, max_batch_size: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device | str | None, kv_cache_dtype: str | None = None) -> None:
        blocks, size = group.pool.num_blocks + 1, group.block_size
        self.group = group
        self._allocate((blocks, n_kv_heads, size, head_dim), dtype, kv_cache_dtype, device)
        self.positions = torch.full((blocks, size), -1, dtype=torch.long, device=self.k.device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.max_new_tokens = max_seq_len  # a position's slot is its own: writing first never evicts a needed key
        group.layers.append(self)

    def _rows(self, seq_ids: torch.Tensor | None, batch: int) -> list[int]:
        return list(range(batch)) if seq_ids is None else [int(s) for s in seq_ids.tolist()]

    def rows_for(self, seq_ids: torch.Tensor | None, batch: int) -> list[int]:
        """The sequences of a call's rows (found once per call, passed back to `read`)."""
        return self._rows(seq_ids, batch)

    def plan(self, seq_ids: torch.Tensor | None, positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(blocks, offsets, batch index, seq index) of a call's valid new tokens: the same for every
        layer of this block group, so a model finds it once per call."""
        slots = self.slot_mapping(seq_ids, positions, valid)
        b_idx, s_idx = valid.nonzero(as_tuple=True)
        chosen = slots[b_idx, s_idx]
        return chosen.div(self.group.block_size, rounding_mode="floor"), chosen % self.group.block_size, b_idx, s_idx

    def check_seq_ids(self, seq_ids: torch.Tensor) -> None:
        """ValueError for seq_ids outside [0, max_batch_size)."""
        if seq_ids.numel() and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= self.max_batch_size):
            raise ValueError(f"seq_ids: {seq_ids.tolist()} has an id outside [0, {self.max_batch_size}); use ids below the manager's max_batch_size")

    def check_positions(self, positions: torch.Tensor, valid: torch.Tensor, seq_ids: torch.Tensor | None = None) -> None:
        """ValueError unless every valid position has a reserved block this sequence alone holds."""
        if not bool(valid.any()):
            return
        top = int(positions[valid].max())
        if top >= self.max_seq_len:
            raise ValueError(f"position_ids: position {top} is beyond the KV cache (max_seq_len={self.max_seq_len}); stop generating earlier")
        rows = self._rows(seq_ids, positions.shape[0])
        tables = self.group.table_tensor(rows, positions.device)
        index = torch.div(positions, self.group.block_size, rounding_mode="floor").clamp(min=0)
        inside = index < tables.shape[1]
        blocks = torch.where(inside, tables.gather(1, index.clamp(max=tables.shape[1] - 1)), self.group.null)
        refs = self.group.ref_tensor(positions.device)[blocks]
        bad = valid & ((blocks == self.group.null) | (refs != 1))
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"position_ids: positions {positions[b][bad[b]].tolist()} of sequence {rows[b]} have no KV cache block of their own; "
                "call kv_mgr.reserve(seq_ids, position_ids, attention_mask) before the forward"
            )

    def read(self, seq_ids: torch.Tensor | None, batch: int, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V `[B, Hkv, L, D]` and positions `[B, L]` of rows seq_ids, gathered from their blocks (L = blocks * block_size).

        `rows`: `rows_for(seq_ids, batch)` when the caller found it already."""
        rows_list = self._rows(seq_ids, batch) if rows is None else rows
        tables = self.group.table_tensor(rows_list, self.k.device)  # [B, n]
        count, n = tables.shape
        k = self.k[tables].permute(0, 2, 1, 3, 4).reshape(count, self.k.shape[1], n * self.group.block_size, self.k.shape[3])
        v = self.v[tables].permute(0, 2, 1, 3, 4).reshape(k.shape)
        scales = [None if s is None else s[tables].permute(0, 2, 1, 3).reshape(k.shape[:3]) for s in (self.k_scale, self.v_scale)]
        return *self._values(k, v, *scales), self.positions[tables].reshape(count, -1)

    def block_table(self, seq_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Block ids `[B, n]` of sequences seq_ids (default 0..B-1); entries they do not hold are the
        always-empty block `num_blocks`."""
        return self.group.table_tensor(self._rows(seq_ids, batch), self.k.device)

    def slot_mapping(self, seq_ids: torch.Tensor | None, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Where each new token goes: `[B, S]` slot `block * block_size + offset` (-1 for padding).

        A slot indexes this layer's pool seen as `[(num_blocks + 1) * block_size]` positions.
        """
        tables = self.block_table(seq_ids, positions.shape[0])
        size = self.group.block_size
        index = torch.div(positions, size, rounding_mode="floor").clamp(0, tables.shape[1] - 1)
        slots = tables.gather(1, index) * size + positions % size
        return slots.masked_fill(~valid, -1)

    def write(
        self, seq_ids: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
        plan: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        """Store new K, V `[B, Hkv, S, D]` at `positions` `[B, S]` (valid tokens only) in their slots
        (`plan`: `self.plan(...)` when the caller made it already)."""
        blocks, offsets, b_idx, s_idx = self.plan(seq_ids, positions, valid) if plan is None else plan
        self._store(blocks, offsets, k[b_idx, :, s_idx], v[b_idx, :, s_idx])
        self.positions[blocks, offsets] = positions[b_idx, s_idx]
