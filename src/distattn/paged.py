"""Block (paged) KV cache: fixed-size blocks shared by all sequences, prefix caching, copy on write.

Seen from attention, a paged layer cache keeps the static cache's contract: `read`
returns a row's keys as K, V `[B, Hkv, L, D]` with positions `[B, L]` (-1: empty) and
`write` stores new tokens at their positions. Storage differs:

- Each layer holds a pool of blocks, K and V `[num_blocks + 1, Hkv, block_size, D]`
  and positions `[num_blocks + 1, block_size]`; the last block is always empty and
  stands in for blocks a sequence does not hold.
- A sequence's block table lists its blocks: position p lives in block
  `table[p // block_size]` at offset `p % block_size`. Layers of the same kind
  (full, sliding window W, chunk C) share block tables and a pool of block ids.
- Sliding-window and chunked layers release blocks whose keys no query can see any
  more (before `p - W + 1`, or before the chunk of `p`), so their memory stays
  bounded by the window, not the sequence.
- Prefix caching: after a prompt is prefilled, `commit` records each full block
  under a hash of all tokens up to its end (and a `cache_key`, e.g. the LoRA
  adapter, since K/V depend on it). A new sequence whose prompt starts with cached
  blocks shares them (reference counted) and prefills only the rest. Released
  blocks stay cached until their memory is reused (least recently released first).
- Copy on write: a block shared by several sequences (`fork`, or a prefix hit) is
  copied before a sequence writes into it.

Blocks are reserved outside the model, once per step, by `reserve(seq_ids,
position_ids, attention_mask)`, which raises before anything changes when the pool
is exhausted; a forward whose positions were not reserved raises, naming `reserve`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from .config import AttentionConfig


class PoolExhausted(ValueError):
    """reserve / add_sequence needs more free blocks than the pool has."""


class BlockPool:
    """Block ids of one layer kind: reference counts, a least-recently-released free list, prefix hashes."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}

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
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None  # still cached under its hash until reallocated

    def register(self, block: int, key: int) -> None:
        if key not in self.block_of and block not in self.hash_of:
            self.block_of[key], self.hash_of[block] = block, key

    def lookup(self, key: int) -> int | None:
        return self.block_of.get(key)

    @property
    def in_use(self) -> int:
        return self.num_blocks - len(self.free)


class BlockGroup:
    """Layers of one kind sharing block tables: full attention, a sliding window, or chunks."""

    def __init__(self, kind: str, limit: int | None, num_blocks: int, block_size: int) -> None:
        self.kind, self.limit, self.block_size = kind, limit, block_size
        self.pool = BlockPool(num_blocks)
        self.null = num_blocks  # the always-empty block
        self.tables: dict[int, list[int | None]] = {}
        self.layers: list[PagedLayerCache] = []
        self.version = 0  # bumped by every change of tables or reference counts
        self._memo: dict[tuple, torch.Tensor] = {}  # tensors derived from the tables, for this version

    def first_needed(self, position: int) -> int:
        """The oldest key position a query at `position` or later can see."""
        if self.kind == "window":
            return max(0, position - self.limit + 1)  # type: ignore[operator]
        if self.kind == "chunk":
            return position // self.limit * self.limit  # type: ignore[operator]
        return 0

    def changed(self) -> None:
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
        """Mark every slot of `block` empty in every layer of the group."""
        for layer in self.layers:
            layer.positions[block] = -1

    def copy_block(self, source: int, target: int, keep_below: int) -> None:
        """Copy a block's K/V in every layer of the group; positions >= keep_below become empty."""
        for layer in self.layers:
            layer.k[target] = layer.k[source]
            layer.v[target] = layer.v[source]
            layer.positions[target] = layer.positions[source].masked_fill(layer.positions[source] >= keep_below, -1)


class PagedLayerCache:
    """One layer's view of the paged cache (the interface attention uses, like LayerKVCache)."""

    paged = True

    def __init__(self, group: BlockGroup, *, n_kv_heads: int, head_dim: int, max_batch_size: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        blocks, size = group.pool.num_blocks + 1, group.block_size
        self.group = group
        self.k = torch.zeros(blocks, n_kv_heads, size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.full((blocks, size), -1, dtype=torch.long, device=self.k.device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.max_new_tokens = max_seq_len  # a position's slot is its own: writing first never evicts a needed key
        group.layers.append(self)

    def _rows(self, seq_ids: torch.Tensor | None, batch: int) -> list[int]:
        return list(range(batch)) if seq_ids is None else [int(s) for s in seq_ids.tolist()]

    def check_seq_ids(self, seq_ids: torch.Tensor) -> None:
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

    def read(self, seq_ids: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V `[B, Hkv, L, D]` and positions `[B, L]` of rows seq_ids, gathered from their blocks (L = blocks * block_size)."""
        tables = self.block_table(seq_ids, batch)  # [B, n]
        rows, n = tables.shape
        k = self.k[tables].permute(0, 2, 1, 3, 4).reshape(rows, self.k.shape[1], n * self.group.block_size, self.k.shape[3])
        v = self.v[tables].permute(0, 2, 1, 3, 4).reshape(k.shape)
        return k, v, self.positions[tables].reshape(rows, -1)

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

    def write(self, seq_ids: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Store new K, V `[B, Hkv, S, D]` at `positions` `[B, S]` (valid tokens only) in their slots."""
        slots = self.slot_mapping(seq_ids, positions, valid)
        b_idx, s_idx = valid.nonzero(as_tuple=True)
        blocks, offsets = slots[b_idx, s_idx].div(self.group.block_size, rounding_mode="floor"), slots[b_idx, s_idx] % self.group.block_size
        self.k[blocks, :, offsets] = k[b_idx, :, s_idx].to(self.k.dtype)
        self.v[blocks, :, offsets] = v[b_idx, :, s_idx].to(self.v.dtype)
        self.positions[blocks, offsets] = positions[b_idx, s_idx]


def _kind(config: AttentionConfig, max_seq_len: int) -> tuple[str, int | None]:
    if config.sliding_window is not None and config.sliding_window < max_seq_len:
        return "window", config.sliding_window
    if config.attention_chunk_size is not None and config.attention_chunk_size < max_seq_len:
        return "chunk", config.attention_chunk_size
    return "full", None


def _block_hashes(tokens: Sequence[int], block_size: int, cache_key: Any) -> list[int]:
    """Hash of each full block, chained: block i's hash covers tokens[: (i + 1) * block_size] and cache_key."""
    hashes, parent = [], hash(("distattn-prefix", cache_key))
    for i in range(len(tokens) // block_size):
        parent = hash((parent, tuple(int(t) for t in tokens[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class PagedKVCacheManager:
    """Paged KV caches for a stack of attention layers (drop-in for KVCacheManager as `kv_mgr`).

    Args:
        configs: one AttentionConfig per layer, or one config with `num_layers`.
        num_blocks: blocks per layer kind (full / window / chunk layers each have a pool).
        block_size: token positions per block.
        max_batch_size: sequences held at once (seq_ids below this).
        max_seq_len: positions stay below this.
        n_kv_heads: kv heads this process holds per layer (tensor parallelism).
        dtype: of the K/V tensors.
        device: of the K/V tensors.

    Per step: `add_sequence(seq_id, prompt_ids)` for a new request (returns how many
    prompt tokens are already cached), `reserve(seq_ids, position_ids, attention_mask)`
    before the forward, `commit(seq_id, prompt_ids)` after a prompt is prefilled,
    `free(seq_id)` when a request ends; `fork(parent, child)` shares a sequence.
    """

    paged = True

    def __init__(
        self,
        configs: AttentionConfig | Sequence[AttentionConfig],
        *,
        num_blocks: int,
        block_size: int = 16,
        max_batch_size: int,
        max_seq_len: int,
        num_layers: int | None = None,
        n_kv_heads: int | Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(configs, AttentionConfig):
            if num_layers is None:
                raise ValueError("num_layers is required when configs is a single AttentionConfig")
            configs = [configs] * num_layers
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: pass a positive integer")
        configs = list(configs)
        heads = [c.n_kv_heads for c in configs] if n_kv_heads is None else (
            [n_kv_heads] * len(configs) if isinstance(n_kv_heads, int) else list(n_kv_heads))
        if len(heads) != len(configs):
            raise ValueError(f"n_kv_heads has {len(heads)} entries for {len(configs)} layers; pass one per layer")
        self.configs, self.block_size = configs, block_size
        self.max_batch_size, self.max_seq_len, self.dp_size = max_batch_size, max_seq_len, 1
        self.groups: dict[tuple[str, int | None], BlockGroup] = {}
        self.layers: list[PagedLayerCache] = []
        for config, layer_heads in zip(configs, heads):
            kind = _kind(config, max_seq_len)
            group = self.groups.setdefault(kind, BlockGroup(*kind, num_blocks, block_size))
            self.layers.append(PagedLayerCache(group, n_kv_heads=layer_heads, head_dim=config.head_dim, max_batch_size=max_batch_size,  # type: ignore[arg-type]
                                               max_seq_len=max_seq_len, dtype=dtype, device=device))
        self.cache_keys: dict[int, Any] = {}
        self.hit_tokens = 0  # prompt tokens served from the prefix cache so far

    @classmethod
    def for_modules(cls, modules: Sequence[Any], **kwargs: Any) -> PagedKVCacheManager:
        """Caches for attention modules (layer i for modules[i]) with their local kv heads and dtype."""
        if any(m.groups.dp_size > 1 for m in modules):
            raise ValueError("the paged KV cache does not support data-parallel decode; use KVCacheManager with dp_size")
        first = next(iter(modules[0].parameters()))
        kwargs.setdefault("dtype", first.dtype)
        kwargs.setdefault("device", first.device)
        return cls([m.config for m in modules], n_kv_heads=[m.n_kv_heads for m in modules], **kwargs)

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, idx: int) -> PagedLayerCache:
        if not isinstance(idx, int) or not 0 <= idx < len(self.layers):
            raise ValueError(f"idx={idx!r} is not a layer of this PagedKVCacheManager (0..{len(self.layers) - 1}); pass idx=layer index")
        return self.layers[idx]

    def __getitem__(self, idx: int) -> PagedLayerCache:
        return self.layer(idx)

    # ---- sequences ----------------------------------------------------------------------

    def _check_seq(self, seq_id: int, name: str = "seq_id") -> int:
        if not isinstance(seq_id, int) or not 0 <= seq_id < self.max_batch_size:
            raise ValueError(f"{name}={seq_id!r} must be an int in [0, {self.max_batch_size})")
        return seq_id

    def add_sequence(self, seq_id: int, token_ids: Sequence[int] | None = None, *, cache_key: Any = None) -> int:
        """Start sequence `seq_id` (dropping what it held); returns how many leading prompt tokens are cached.

        With `token_ids`, the longest prefix of whole blocks found in the prefix cache
        (always leaving at least the last token to compute) is shared; the caller
        prefills only `token_ids[hit:]` at positions `hit, hit + 1, ...`. Window and
        chunked layers need only the blocks their first query can still see.
        `cache_key` separates prefixes whose K/V differ (e.g. the LoRA adapter).
        """
        self._check_seq(seq_id)
        self.free(seq_id)
        self.cache_keys[seq_id] = cache_key
        hit = 0 if token_ids is None else self._longest_hit(_block_hashes(token_ids[: len(token_ids) - 1], self.block_size, cache_key))
        for group in self.groups.values():
            group.changed()
            table: list[int | None] = []
            if hit:
                hashes = _block_hashes(token_ids[: hit * self.block_size], self.block_size, cache_key)  # type: ignore[index]
                table = [None] * hit
                for i in self._needed_blocks(group, hit):
                    block = group.pool.lookup(hashes[i])
                    group.pool.acquire(block)  # type: ignore[arg-type]
                    table[i] = block
            group.tables[seq_id] = table
        self.hit_tokens += hit * self.block_size
        return hit * self.block_size

    def _needed_blocks(self, group: BlockGroup, n: int) -> range:
        """Blocks of the first n a sequence resuming at block n needs: those its first query can
        see, and at least the last (so a hit always means the prefix was computed before)."""
        return range(min(group.first_needed(n * self.block_size) // self.block_size, n - 1), n)

    def _longest_hit(self, hashes: list[int]) -> int:
        """Most leading full blocks every layer kind holds what it needs of."""
        for n in range(len(hashes), 0, -1):
            if all(all(group.pool.lookup(hashes[i]) is not None for i in self._needed_blocks(group, n)) for group in self.groups.values()):
                return n
        return 0

    def commit(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Record the full blocks of `token_ids` (already written for `seq_id`) in the prefix cache."""
        self._check_seq(seq_id)
        hashes = _block_hashes(token_ids, self.block_size, self.cache_keys.get(seq_id))
        for group in self.groups.values():
            table = group.tables.get(seq_id, [])
            for i, key in enumerate(hashes[: len(table)]):
                if table[i] is not None:
                    group.pool.register(table[i], key)  # type: ignore[arg-type]

    def fork(self, parent: int, child: int) -> None:
        """`child` continues from everything `parent` holds, sharing its blocks (copied on first write)."""
        self._check_seq(parent, "parent")
        self._check_seq(child, "child")
        if parent == child:
            raise ValueError("fork: parent and child must differ")
        self.free(child)
        self.cache_keys[child] = self.cache_keys.get(parent)
        for group in self.groups.values():
            group.changed()
            table = list(group.tables.get(parent, []))
            for block in table:
                if block is not None:
                    group.pool.acquire(block)
            group.tables[child] = table

    def free(self, seq_id: int) -> None:
        """Release every block of `seq_id` (their prefix hashes stay until the memory is reused)."""
        for group in self.groups.values():
            group.changed()
            for block in group.tables.pop(seq_id, []):
                if block is not None:
                    group.pool.release(block)
        self.cache_keys.pop(seq_id, None)

    def reset(self, seq_ids: torch.Tensor | None = None) -> None:
        """Free sequences seq_ids (all by default)."""
        ids = {s for g in self.groups.values() for s in g.tables} if seq_ids is None else [int(s) for s in seq_ids.reshape(-1).tolist()]
        for seq_id in list(ids):
            self.free(seq_id)

    # ---- per step -------------------------------------------------------------------------

    def reserve(self, seq_ids: torch.Tensor | Sequence[int] | None, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Give every new token of the coming forward a block its sequence alone holds.

        Args:
            seq_ids: `[B]` sequences (None: 0..B-1); a sequence not added yet starts empty.
            position_ids: `[B, S]` positions of the new tokens.
            attention_mask: `[B, S]` real tokens (True/1); padding needs no block.

        A row starting at position 0 restarts its sequence. Shared blocks about to be
        written are copied first; window / chunk layers release blocks no query will
        see again. Raises PoolExhausted (a ValueError) before changing anything when
        the free blocks do not suffice.
        """
        batch = position_ids.shape[0]
        valid = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        ids = list(range(batch)) if seq_ids is None else [int(s) for s in torch.as_tensor(seq_ids).reshape(-1).tolist()]
        if len(ids) != batch or len(set(ids)) != batch:
            raise ValueError(f"seq_ids {ids} must name {batch} different sequences, one per row of position_ids")
        spans = []
        for seq_id, pos, real in zip(ids, position_ids, valid):
            self._check_seq(seq_id, "seq_ids entry")
            if bool(real.any()):
                first, last = int(pos[real].min()), int(pos[real].max())
                if last >= self.max_seq_len:
                    raise ValueError(f"position_ids: position {last} is beyond the KV cache (max_seq_len={self.max_seq_len})")
                spans.append((seq_id, first, last))
        plans = {kind: self._plan(group, spans) for kind, group in self.groups.items()}  # raises before any change
        for seq_id, first, _ in spans:
            if first == 0:  # a restart: the old content goes (the prefix-cache key stays)
                key = self.cache_keys.get(seq_id)
                self.free(seq_id)
                self.cache_keys[seq_id] = key
        for kind, group in self.groups.items():
            self._apply(group, plans[kind])

    def _plan(self, group: BlockGroup, spans: list[tuple[int, int, int]]) -> list[tuple[str, int, int, int]]:
        """Actions (what, seq_id, block index, keep_below) for one group, checked against the free blocks."""
        refs: Counter[int] = Counter()
        actions, allocations, freed = [], 0, 0
        size = self.block_size

        def drop(block: int | None) -> None:
            nonlocal freed
            if block is not None:
                refs[block] += 1
                freed += refs[block] == group.pool.refs[block]

        for seq_id, first, last in spans:
            table = [] if first == 0 else group.tables.get(seq_id, [])
            if first == 0:
                for block in group.tables.get(seq_id, []):
                    drop(block)
            for i in range(min(len(table), group.first_needed(first) // size)):
                if table[i] is not None:
                    drop(table[i])
                    actions.append(("release", seq_id, i, 0))
            for i in range(first // size, last // size + 1):
                block = table[i] if i < len(table) else None
                if block is None:
                    allocations += 1
                    actions.append(("allocate", seq_id, i, 0))
                elif group.pool.refs[block] - refs[block] > 1:
                    allocations += 1
                    drop(block)
                    actions.append(("copy", seq_id, i, first))
        available = len(group.pool.free) + freed
        if allocations > available:
            raise PoolExhausted(
                f"the paged KV cache needs {allocations} more blocks for {group.kind} layers but {available} are free "
                f"(num_blocks={group.pool.num_blocks}); free finished sequences or build the manager with more num_blocks"
            )
        return actions

    def _apply(self, group: BlockGroup, actions: list[tuple[str, int, int, int]]) -> None:
        group.changed()
        for what, seq_id, i, keep_below in actions:
            table = group.tables.setdefault(seq_id, [])
            if i >= len(table):
                table.extend([None] * (i + 1 - len(table)))
            if what == "release":
                group.pool.release(table[i])  # type: ignore[arg-type]
                table[i] = None
            elif what == "allocate":
                table[i] = group.pool.allocate()
                group.clear_block(table[i])  # a reused block's old positions would be read as this sequence's
            else:  # copy on write
                source, table[i] = table[i], group.pool.allocate()
                group.copy_block(source, table[i], keep_below)  # type: ignore[arg-type]
                group.pool.release(source)  # type: ignore[arg-type]

    # ---- accounting ----------------------------------------------------------------------

    def blocks_in_use(self) -> int:
        """Blocks held by sequences, over all layer kinds."""
        return sum(group.pool.in_use for group in self.groups.values())

    def bytes_in_use(self) -> int:
        """K/V bytes of the blocks in use, over all layers."""
        total = 0
        for layer in self.layers:
            per_block = 2 * layer.k[0].numel() * layer.k.element_size()
            total += per_block * layer.group.pool.in_use
        return total
