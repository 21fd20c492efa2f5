"""KV caches: static per-layer caches, rolling window caches, seq_id rows.

Contract: per layer, K and V are `[max_batch_size, n_kv_heads, cache_len, head_dim]`
and `positions` is `[max_batch_size, cache_len]` (int64, -1 for an empty slot).
A token at position p lives in slot p (static) or p % cache_len (rolling). Sliding
window layers hold only `sliding_window` slots, chunked layers only
`attention_chunk_size`: the keys any query can still see. Rows are addressed by
seq_ids (continuous batching): batch row b of a forward call reads and writes cache
row seq_ids[b].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import AttentionConfig
from ..ops.kv_quant import check_kv_cache_dtype
from ..ops.masks import first_positions
from ..parallel.sequence import dp_rows_per_replica
from .store import KVStore, WritePlan


class LayerKVCache(KVStore):
    """One layer's cache. Writes are validated by the caller (`check_positions`)."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        rows: int,
        n_kv_heads: int,
        cache_len: int,
        head_dim: int,
        max_seq_len: int,
        rolling: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
        max_new_tokens: int = 1,
        kv_cache_dtype: str | None = None,
    ) -> None:
        self._allocate((rows, n_kv_heads, cache_len, head_dim), dtype, kv_cache_dtype, device)
        self.positions = torch.full((rows, cache_len), -1, dtype=torch.long, device=self.k.device)
        self.max_batch_size = max_batch_size  # seq_ids stay below this (all data-parallel replicas)
        self.max_seq_len = max_seq_len  # positions must stay below this
        self.rolling = rolling  # slot = position % cache_len
        # new tokens one call may store before its queries read the cache without losing a
        # key they need: any number for a static cache, the speculation width for a rolling one
        self.max_new_tokens = max_seq_len if not rolling else max_new_tokens

    @property
    def cache_len(self) -> int:
        """Slots per row."""
        return self.k.shape[2]

    def geometry(self) -> tuple[int, bool]:
        """(cache_len, rolling): caches alike share one write plan."""
        return self.cache_len, self.rolling

    def check_positions(self, positions: torch.Tensor, valid: torch.Tensor, seq_ids: torch.Tensor | None = None) -> None:
        """ValueError if a valid position cannot be stored in this cache (any row can: seq_ids do not matter)."""
        if not bool(valid.any()):
            return
        top = int(positions[valid].max())
        if top >= self.max_seq_len:
            raise ValueError(
                f"position_ids: position {top} is beyond the KV cache (max_seq_len={self.max_seq_len}); "
                "build the KVCacheManager with a larger max_seq_len or stop generating earlier"
            )

    def check_rewind(self, positions: torch.Tensor, valid: torch.Tensor, seq_ids: torch.Tensor | None = None) -> None:
        """ValueError when a row continues from beyond what the cache holds (a gap), or, in a rolling
        cache, from further back than it keeps.

        A row whose cache holds positions up to `last` (-1: nothing) may continue at most at last + 1:
        the positions in between were never written, and the new tokens would attend to nothing there.
        A rolling cache holds a row's last `cache_len` = window + speculation_width - 1 tokens, so a
        call may go back over at most speculation_width - 1 tokens it stored (rejected drafts); from
        further back, the keys its queries need were overwritten. Starting over at position 0 is fine.
        """
        rows = torch.arange(positions.shape[0], device=positions.device) if seq_ids is None else seq_ids.to(positions.device)
        first = first_positions(positions, valid)  # [B] (NO_TOKENS for a row of padding)
        last = self.positions[rows].max(dim=1).values  # [B], -1 for an empty row
        slack = self.max_new_tokens - 1
        gap = valid.any(dim=1) & (first > last + 1)
        rewind = (first > 0) & (first <= last) & (first < last - slack) if self.rolling else torch.zeros_like(gap)
        if not bool((gap | rewind).any()):
            return
        b = int((gap | rewind).nonzero()[0, 0])
        at, held, row = int(first[b]), int(last[b]), int(rows[b])
        if bool(gap[b]):
            holds = "holds nothing" if held < 0 else f"holds positions up to {held}"
            raise ValueError(f"position_ids: cache row {row} {holds}, so the call cannot continue it at position {at}: "
                             f"feed its tokens from position {held + 1} on (a prompt from position 0)")
        raise ValueError(
            f"position_ids: row {row} continues at position {at} but its rolling window cache already "
            f"holds up to position {held} and keeps only {slack} position(s) of rewind (speculation_width="
            f"{self.max_new_tokens}); build the cache with speculation_width >= {held - at + 1}"
        )

    def check_seq_ids(self, seq_ids: torch.Tensor) -> None:
        """ValueError for seq_ids outside [0, max_batch_size)."""
        if seq_ids.numel() and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= self.max_batch_size):
            raise ValueError(
                f"seq_ids: {seq_ids.tolist()} has an id outside [0, {self.max_batch_size}); "
                "use ids below the KVCacheManager's max_batch_size"
            )

    def rows_for(self, seq_ids: torch.Tensor | None, batch: int) -> slice | torch.Tensor:
        """The cache rows of a call: a slice when seq_ids are consecutive (read in place), else seq_ids.

        Every row of the cache is `slice(None)`: no batch size in the slice, so a compiled step
        stays shape-generic (`DecoderLM.compile_decode`).
        """
        if seq_ids is None:
            first, count = 0, batch
        else:
            first, count = int(seq_ids[0]), len(seq_ids)
            if not torch.equal(seq_ids, torch.arange(first, first + count, device=seq_ids.device)):
                return seq_ids
        return slice(None) if first == 0 and count == self.max_batch_size else slice(first, first + count)

    def read(
        self, seq_ids: torch.Tensor | None, batch: int, rows: slice | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V `[B, Hkv, L, D]` and positions `[B, L]` of rows seq_ids (default 0..B-1).

        Consecutive rows are views of the cache (no copy); other seq_ids gather copies. A quantized
        cache returns them dequantized to its `dtype` (the attention read).
        `rows`: `rows_for(seq_ids, batch)`, when the caller found it already.
        """
        rows = self.rows_for(seq_ids, batch) if rows is None else rows
        scales = (self.k_scale[rows], self.v_scale[rows]) if self.k_scale is not None and self.v_scale is not None else (None, None)
        return *self._values(self.k[rows], self.v[rows], *scales), self.positions[rows]

    def plan(self, seq_ids: torch.Tensor | None, positions: torch.Tensor, valid: torch.Tensor) -> WritePlan:
        """Where `write` stores new tokens at `positions` `[B, S]` (valid ones) in this cache's geometry.

        Caches of the same (cache_len, rolling) share a plan, so a model finds it once per call.
        """
        batch, seq = positions.shape
        rows = torch.arange(batch, device=positions.device) if seq_ids is None else seq_ids.to(positions.device)
        starts = first_positions(positions, valid)
        if bool(valid.all()) and bool((starts > 0).all()) and (not self.rolling or seq <= self.cache_len):
            return self.in_order_plan(rows, positions)  # a decode or speculative step
        restart = rows[starts == 0]
        keep = valid
        if self.rolling:
            last = torch.where(valid, positions, -1).max(dim=1, keepdim=True).values  # [B, 1]
            keep = keep & (positions > last - self.cache_len)
        b_idx, s_idx = keep.nonzero(as_tuple=True)  # tokens to store
        pos = positions[b_idx, s_idx]
        slots = pos % self.cache_len if self.rolling else pos
        return WritePlan(restart, rows[b_idx], slots, pos, b_idx, s_idx)

    def in_order_plan(self, rows: torch.Tensor, positions: torch.Tensor) -> WritePlan:
        """The plan of a step that stores every new token, in order (nothing restarts): cache rows `rows` `[B]`,
        positions `[B, S]`. Pure tensor work whose shapes depend only on [B, S] (no host sync, capturable)."""
        batch, seq = positions.shape
        b_idx = torch.arange(batch, device=positions.device).repeat_interleave(seq)
        s_idx = torch.arange(seq, device=positions.device).repeat(batch)
        pos = positions.reshape(-1)
        return WritePlan(rows[:0], rows[b_idx], pos % self.cache_len if self.rolling else pos, pos, b_idx, s_idx)

    def write(
        self,
        seq_ids: torch.Tensor | None,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        plan: WritePlan | None = None,
    ) -> None:
        """Store new tokens at their positions.

        Args:
            seq_ids: `[B]` cache rows, or None for rows 0..B-1.
            k: `[B, Hkv, S, D]` new keys.
            v: `[B, Hkv, S, D]` new values.
            positions: `[B, S]` their positions (unique within a row).
            valid: `[B, S]` bool; padding tokens (False) are not stored.
            plan: `self.plan(seq_ids, positions, valid)`, when the caller made it already.

        A row whose first new token is at position 0 starts a new sequence: its old
        slots are emptied first (positions -1, K and V zero). On a rolling cache only each row's latest
        cache_len tokens are kept.
        """
        plan = self.plan(seq_ids, positions, valid) if plan is None else plan
        self._empty(plan.restart)
        self._store(plan.rows, plan.slots, k[plan.batch_index, :, plan.seq_index], v[plan.batch_index, :, plan.seq_index])  # [N, Hkv, D]
        self.positions[plan.rows, plan.slots] = plan.positions

    def reset(self, seq_ids: torch.Tensor | None = None) -> None:
        """Empty cache rows `seq_ids` (all rows by default)."""
        self._empty(torch.arange(self.k.shape[0], device=self.k.device) if seq_ids is None else seq_ids.to(self.k.device))

    def _empty(self, rows: torch.Tensor) -> None:
        """Empty whole rows: no position, and zero K / V, so nothing of an earlier sequence (a NaN or
        Inf it held included) can reach the next one, whatever a kernel does with masked slots."""
        if rows.numel() == 0:  # a decode step's plan restarts nothing (a static shape: no host sync, nothing traced)
            return
        self.positions.index_fill_(0, rows, -1)
        self.zero(rows)


def _cache_geometry(config: AttentionConfig, max_seq_len: int, speculation_width: int) -> tuple[int, bool]:
    """(cache_len, rolling) for one layer.

    A windowed or chunked layer needs its last W (or C) keys. A speculative step of
    n tokens may be rejected after it wrote, and the next step then needs keys from
    up to n - 1 positions further back: W + n - 1 slots keep them.
    """
    limit = config.sliding_window or config.attention_chunk_size
    if limit is not None and limit + speculation_width - 1 < max_seq_len:
        return limit + speculation_width - 1, True
    return max_seq_len, False


def layer_specs(
    configs: AttentionConfig | Sequence[AttentionConfig], num_layers: int | None, n_kv_heads: int | Sequence[int] | None
) -> tuple[list[AttentionConfig], list[int]]:
    """(one config per layer, this process's kv heads per layer) from a manager's arguments."""
    if isinstance(configs, AttentionConfig):
        if num_layers is None:
            raise ValueError("num_layers is required when configs is a single AttentionConfig")
        configs = [configs] * num_layers
    elif num_layers is not None and num_layers != len(configs):
        raise ValueError(f"num_layers={num_layers} but {len(configs)} configs were given; pass one or match them")
    configs = list(configs)
    if n_kv_heads is None:
        return configs, [c.n_kv_heads for c in configs]
    heads = [n_kv_heads] * len(configs) if isinstance(n_kv_heads, int) else list(n_kv_heads)
    if len(heads) != len(configs):
        raise ValueError(f"n_kv_heads has {len(heads)} entries for {len(configs)} layers; pass one per layer")
    return configs, heads


def check_positive(**values: object) -> None:
    """ValueError naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} is invalid: pass a positive integer")


def module_cache_kwargs(modules: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A manager's arguments for attention modules: their configs, local kv heads, dtype and device."""
    weight = modules[0].o_proj.weight  # the layer's compute dtype (norm modules of NxDI layers may differ)
    kwargs.setdefault("dtype", weight.dtype)
    kwargs.setdefault("device", weight.device)
    return {"configs": [m.attn_config for m in modules], "n_kv_heads": [m.n_kv_heads for m in modules], **kwargs}


class LayerStack:
    """Indexing shared by the cache managers: `layers[idx]` with a clear error."""

    layers: list[Any]  # one KVStore per layer
    dp_size: int = 1  # data-parallel replicas sharing the rows (each holds its own)

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, idx: int) -> Any:
        """The cache of layer `idx`; ValueError when out of range."""
        if not isinstance(idx, int) or not 0 <= idx < len(self.layers):
            raise ValueError(f"idx={idx!r} is not a layer of this {type(self).__name__} (0..{len(self.layers) - 1}); pass idx=layer index")
        return self.layers[idx]

    def __getitem__(self, idx: int) -> Any:
        return self.layer(idx)


class KVCacheManager(LayerStack):
    """Per-layer KV caches for a stack of attention layers.

    Args:
        configs: one AttentionConfig per layer (layer i uses configs[i]), or a single
            config repeated `num_layers` times.
        max_batch_size: cache rows (sequences served at once).
        max_seq_len: positions stay below this.
        num_layers: needed when `configs` is a single config.
        speculation_width: the most tokens one speculative step writes (1 without
            speculation). Rolling caches keep that many - 1 extra slots, so that
            rejected draft tokens never evict keys the accepted ones still need.
        n_kv_heads: kv heads this process holds per layer (one int for all layers), when
            tensor parallelism shards them; default each config's num_key_value_heads.
            `KVCacheManager.for_modules` reads them from the modules.
        dtype: of the K/V that reads return (the layers' compute dtype).
        device: of the K/V tensors.
        kv_cache_dtype: None stores K/V in `dtype`; "fp8" (e4m3, direct cast) or "int8" (a
            scale per token and kv head) stores them quantized (`distattn.ops.kv_quant`).

    Sliding-window layers get rolling caches of `sliding_window + speculation_width - 1`
    slots, chunked layers of `attention_chunk_size + speculation_width - 1`; others
    (and any layer whose window is not shorter than max_seq_len) get `max_seq_len`.
    """

    def __init__(
        self,
        configs: AttentionConfig | Sequence[AttentionConfig],
        *,
        max_batch_size: int,
        max_seq_len: int,
        num_layers: int | None = None,
        speculation_width: int = 1,
        n_kv_heads: int | Sequence[int] | None = None,
        dp_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        kv_cache_dtype: str | None = None,
    ) -> None:
        check_kv_cache_dtype(kv_cache_dtype)
        self.configs, heads = layer_specs(configs, num_layers, n_kv_heads)
        check_positive(max_batch_size=max_batch_size, max_seq_len=max_seq_len, speculation_width=speculation_width, dp_size=dp_size)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.speculation_width = speculation_width
        self.dp_size = dp_size
        self.rows_per_replica = dp_rows_per_replica(max_batch_size, dp_size)
        rows = self.rows_per_replica + (1 if dp_size > 1 else 0)  # + the garbage row
        self.layers: list[LayerKVCache] = []
        for config, layer_heads in zip(self.configs, heads):
            cache_len, rolling = _cache_geometry(config, max_seq_len, speculation_width)
            self.layers.append(
                LayerKVCache(
                    max_batch_size=max_batch_size,
                    rows=rows,
                    n_kv_heads=layer_heads,
                    cache_len=cache_len,
                    head_dim=config.head_dim,
                    max_seq_len=max_seq_len,
                    rolling=rolling,
                    dtype=dtype,
                    device=device,
                    max_new_tokens=speculation_width,
                    kv_cache_dtype=kv_cache_dtype,
                )
            )

    @classmethod
    def for_modules(cls, modules: Sequence[Any], **kwargs: Any) -> KVCacheManager:
        """Caches for attention modules (layer i for modules[i]) with their local kv heads and dtype.

        kwargs: max_batch_size, max_seq_len, speculation_width, device, kv_cache_dtype (see __init__).
        """
        kwargs.setdefault("dp_size", modules[0].groups.dp_size)
        return cls(**module_cache_kwargs(modules, kwargs))

    def reset(self, seq_ids: torch.Tensor | Sequence[int] | None = None) -> None:
        """Empty rows seq_ids (all by default) in every layer: K / V zeroed, no positions.

        Checked before any row changes: ids must be integers in [0, max_batch_size); under data
        parallelism, this replica's local rows [0, rows_per_replica).
        """
        if seq_ids is not None:
            seq_ids = reset_ids(seq_ids, self.rows_per_replica if self.dp_size > 1 else self.max_batch_size)
        for layer in self.layers:
            layer.reset(seq_ids)

    def memory_bytes(self) -> int:
        """Bytes the K/V caches (and their scales) of every layer hold."""
        return sum(layer.memory_bytes() for layer in self.layers)


def reset_ids(seq_ids: torch.Tensor | Sequence[int], rows: int) -> torch.Tensor:
    """seq_ids of a reset as a long tensor `[N]`; ValueError / TypeError naming seq_ids otherwise."""
    if not isinstance(seq_ids, torch.Tensor):
        if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Sequence) or any(
            isinstance(s, bool) or not isinstance(s, int) for s in seq_ids
        ):
            raise TypeError(f"seq_ids={seq_ids!r} must be a tensor or a list of ints")
        seq_ids = torch.tensor(list(seq_ids), dtype=torch.long)
    if seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise ValueError(f"seq_ids dtype {seq_ids.dtype} must be an integer type")
    seq_ids = seq_ids.reshape(-1).long()
    if seq_ids.numel() and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= rows):
        raise ValueError(f"seq_ids {seq_ids.tolist()} has an id outside [0, {rows}): a negative id is not 'the last row'")
    return seq_ids
