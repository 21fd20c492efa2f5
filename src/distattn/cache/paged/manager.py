"""PagedKVCacheManager: sequences, per-step reservations (copy on write, released blocks), prefix caching."""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from ...config import AttentionConfig
from ..static import LayerStack, check_positive, layer_specs, module_cache_kwargs, reset_ids
from ...ops.kv_quant import check_kv_cache_dtype
from .blocks import BlockGroup, PoolExhausted
from .layer import PagedLayerCache


def _kind(config: AttentionConfig, max_seq_len: int) -> tuple[str, int | None]:
    if config.sliding_window is not None and config.sliding_window < max_seq_len:
        return "window", config.sliding_window
    if config.attention_chunk_size is not None and config.attention_chunk_size < max_seq_len:
        return "chunk", config.attention_chunk_size
    return "full", None


def _block_hashes(tokens: Sequence[int], block_size: int, cache_key: Any) -> list[bytes]:
    """Digest of each full block, chained: block i's covers tokens[: (i + 1) * block_size] and cache_key.

    SHA-256, so equal digests mean equal prefixes (no silent reuse after a collision) and
    every process computes the same digests.
    """
    digests, parent = [], hashlib.sha256(repr(("distattn-prefix", cache_key)).encode()).digest()
    for i in range(len(tokens) // block_size):
        block = struct.pack(f"<{block_size}q", *(int(t) for t in tokens[i * block_size : (i + 1) * block_size]))
        parent = hashlib.sha256(parent + block).digest()
        digests.append(parent)
    return digests


class PagedKVCacheManager(LayerStack):
    """Paged KV caches for a stack of attention layers (drop-in for KVCacheManager as `kv_mgr`).

    Args:
        configs: one AttentionConfig per layer, or one config with `num_layers`.
        num_blocks: blocks per layer kind (full / window / chunk layers each have a pool).
        block_size: token positions per block.
        max_batch_size: sequences held at once (seq_ids below this).
        max_seq_len: positions stay below this.
        n_kv_heads: kv heads this process holds per layer (tensor parallelism).
        dtype: of the K/V that reads return (the layers' compute dtype).
        device: of the K/V tensors.
        kv_cache_dtype: None, "fp8" or "int8" (quantized blocks; see KVCacheManager).

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
        kv_cache_dtype: str | None = None,
    ) -> None:
        check_kv_cache_dtype(kv_cache_dtype)
        configs, heads = layer_specs(configs, num_layers, n_kv_heads)
        check_positive(num_blocks=num_blocks, block_size=block_size, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        self.configs, self.block_size = configs, block_size
        self.max_batch_size, self.max_seq_len, self.dp_size = max_batch_size, max_seq_len, 1
        self.groups: dict[tuple[str, int | None], BlockGroup] = {}
        self.layers: list[PagedLayerCache] = []
        for config, layer_heads in zip(configs, heads):
            kind = _kind(config, max_seq_len)
            group = self.groups.setdefault(kind, BlockGroup(*kind, num_blocks, block_size))
            self.layers.append(PagedLayerCache(group, n_kv_heads=layer_heads, head_dim=config.head_dim, max_batch_size=max_batch_size,
                                               max_seq_len=max_seq_len, dtype=dtype, device=device, kv_cache_dtype=kv_cache_dtype))
        self.cache_keys: dict[int, Any] = {}
        self.hit_tokens = 0  # prompt tokens served from the prefix cache so far

    def shortfall(self, length: int, step_tokens: int) -> str | None:
        """Why one sequence of `length` tokens, fed at most `step_tokens` per forward, can never fit in the pools
        (even alone), or None: the blocks it holds at once in a pool against the pool's size."""
        for (kind, limit), group in self.groups.items():
            span = length if limit is None else min(length, limit + step_tokens)  # window / chunk layers free old blocks
            need = -(-span // self.block_size) + (0 if limit is None else 1)  # (a span may straddle one block more)
            need = min(need, -(-length // self.block_size))
            if need > group.pool.num_blocks:
                layers = "full-attention" if limit is None else f"{kind} ({limit})"
                return (f"it needs up to {need} blocks of {self.block_size} tokens in the {layers} layers' pool, which has "
                        f"{group.pool.num_blocks}")
        return None

    @classmethod
    def for_modules(cls, modules: Sequence[Any], **kwargs: Any) -> PagedKVCacheManager:
        """Caches for attention modules (layer i for modules[i]) with their local kv heads and dtype."""
        if any(m.groups.dp_size > 1 for m in modules):
            raise ValueError("the paged KV cache does not support data-parallel decode; use KVCacheManager with dp_size")
        return cls(**module_cache_kwargs(modules, kwargs))

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
            if hit and token_ids is not None:
                hashes = _block_hashes(token_ids[: hit * self.block_size], self.block_size, cache_key)
                table = [None] * hit
                for i in self._needed_blocks(group, hit):
                    block = group.pool.lookup(hashes[i])
                    assert block is not None  # a hit: every hash up to `hit` is cached
                    group.pool.acquire(block)
                    table[i] = block
            group.tables[seq_id] = table
        self.hit_tokens += hit * self.block_size
        return hit * self.block_size

    def _needed_blocks(self, group: BlockGroup, n: int) -> range:
        """Blocks of the first n a sequence resuming at block n needs: those its first query can
        see, and at least the last (so a hit always means the prefix was computed before)."""
        return range(min(group.first_needed(n * self.block_size) // self.block_size, n - 1), n)

    def _longest_hit(self, hashes: list[bytes]) -> int:
        """Most leading full blocks every layer kind holds what it needs of (linear in the prompt)."""
        held = {}  # per group: prefix sums of "block i is cached"
        for kind, group in self.groups.items():
            counts = [0]
            for key in hashes:
                counts.append(counts[-1] + (group.pool.lookup(key) is not None))
            held[kind] = counts
        for n in range(len(hashes), 0, -1):
            if all(held[kind][n] - held[kind][self._needed_blocks(group, n).start] == len(self._needed_blocks(group, n))
                   for kind, group in self.groups.items()):
                return n
        return 0

    def commit(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Record the full blocks of `token_ids` (already written for `seq_id`) in the prefix cache."""
        self._check_seq(seq_id)
        hashes = _block_hashes(token_ids, self.block_size, self.cache_keys.get(seq_id))
        for group in self.groups.values():
            table = group.tables.get(seq_id, [])
            for block, key in zip(table, hashes):
                if block is not None:
                    group.pool.register(block, key)

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
        """Release every block of `seq_id` (their prefix hashes stay until the memory is reused); a
        sequence that holds nothing frees nothing."""
        self._check_seq(seq_id)
        for group in self.groups.values():
            group.changed()
            for block in group.tables.pop(seq_id, []):
                if block is not None:
                    group.pool.release(block)
        self.cache_keys.pop(seq_id, None)

    def reset(self, seq_ids: torch.Tensor | None = None) -> None:
        """Free sequences seq_ids (all by default)."""
        ids = {s for g in self.groups.values() for s in g.tables} if seq_ids is None else reset_ids(seq_ids, self.max_batch_size).tolist()
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
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.dtype.is_floating_point:
            raise ValueError("position_ids must be an integer tensor [batch, seq]")
        batch = position_ids.shape[0]
        valid = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if bool((position_ids[valid] < 0).any()):
            raise ValueError(f"position_ids: {int(position_ids[valid].min())} is negative; positions count from 0")
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
                elif group.pool.refs[block] - refs[block] > 1 or block in group.pool.hash_of:  # shared, or in the prefix cache
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
            held = table[i]
            if what == "allocate":
                block = table[i] = group.pool.allocate()
                group.clear_block(block)  # a reused block's old positions would be read as this sequence's
                continue
            assert held is not None  # release and copy-on-write act on a block the sequence holds
            if what == "release":
                group.pool.release(held)
                table[i] = None
            else:  # copy on write
                copy = table[i] = group.pool.allocate()
                group.copy_block(held, copy, keep_below)
                group.pool.release(held)

    # ---- accounting ----------------------------------------------------------------------

    def blocks_in_use(self) -> int:
        """Blocks held by sequences, over all layer kinds."""
        return sum(group.pool.in_use for group in self.groups.values())

    def bytes_in_use(self) -> int:
        """K/V bytes of the blocks in use, over all layers."""
        total = 0
        for layer in self.layers:
            total += layer.memory_bytes() // (layer.group.pool.num_blocks + 1) * layer.group.pool.in_use
        return total
