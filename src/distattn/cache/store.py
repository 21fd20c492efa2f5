"""What every KV cache stores and promises: K/V as stored (plain or quantized) and the layer-cache interface.

`KVStore` holds one layer's K and V (plain, or fp8 / int8 codes with scales) and declares what
attention asks of any layer cache, static, rolling or paged: checks of a call's rows and
positions, where its tokens go (`plan`), `write`, `read`. A cache says what it is through
fields (`paged`, `rolling`), never through attributes looked up by name.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.kv_quant import KVCacheDtype, check_kv_cache_dtype, code_dtype, dequantize_kv, quantize_kv


@dataclass(frozen=True)
class WritePlan:
    """Where one call's valid new tokens go in the caches of one geometry, found once per call."""

    restart: torch.Tensor  # [R] cache rows whose sequence starts over: emptied first
    rows: torch.Tensor  # [N] cache row of each stored token
    slots: torch.Tensor  # [N] its slot
    positions: torch.Tensor  # [N] its position
    batch_index: torch.Tensor  # [N] its batch row in the call
    seq_index: torch.Tensor  # [N] its column in the call


class KVStore:
    """K and V of one layer's cache as stored: plain, or quantized codes (+ int8 scales).

    Shared by the static and paged caches. `k`, `v`: `[X, Hkv, Y, D]` codes (X, Y: rows and
    slots, or blocks and offsets); `k_scale`, `v_scale`: `[X, Hkv, Y]` fp32 for int8, else None.
    `dtype` is what reads return (the layer's compute dtype).
    """

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor  # [X, Y] long: each slot's position, -1 when empty
    dtype: torch.dtype
    kv_cache_dtype: KVCacheDtype | None
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    max_batch_size: int  # seq_ids stay below this
    max_seq_len: int  # positions stay below this
    max_new_tokens: int  # new tokens a call may store before its queries read without losing a key they need
    paged: bool = False  # rows live in shared blocks (a block table per sequence)
    rolling: bool = False  # slot = position % cache_len (a sliding-window or chunked layer's ring)

    # ---- what attention asks of every layer cache (static, rolling, paged) ----

    def geometry(self) -> Hashable:
        """What decides where a call's tokens go: caches of one geometry share a write plan."""
        raise NotImplementedError

    def check_seq_ids(self, seq_ids: torch.Tensor) -> None:
        """ValueError for cache rows this cache does not have."""
        raise NotImplementedError

    def check_positions(self, positions: torch.Tensor, valid: torch.Tensor, seq_ids: torch.Tensor | None = None) -> None:
        """ValueError for positions this cache cannot store."""
        raise NotImplementedError

    def check_rewind(self, positions: torch.Tensor, valid: torch.Tensor, seq_ids: torch.Tensor | None = None) -> None:
        """ValueError when a row continues from beyond what the cache holds (a gap), or from further back than a
        rolling cache keeps (the static cache checks; the paged Engine feeds positions itself)."""

    def rows_for(self, seq_ids: torch.Tensor | None, batch: int) -> Any:
        """The rows a call reads (found once per call, passed back to `read`)."""
        raise NotImplementedError

    def read(self, seq_ids: torch.Tensor | None, batch: int, rows: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V `[B, Hkv, L, D]` (dequantized) and positions `[B, L]` (-1: empty) of rows seq_ids."""
        raise NotImplementedError

    def plan(self, seq_ids: torch.Tensor | None, positions: torch.Tensor, valid: torch.Tensor) -> Any:
        """Where `write` stores a call's valid new tokens (the same for every cache of this geometry)."""
        raise NotImplementedError

    def write(self, seq_ids: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              plan: Any = None) -> None:
        """Store new K, V `[B, Hkv, S, D]` at `positions` `[B, S]` (valid tokens only)."""
        raise NotImplementedError

    # ---- storage ----

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, kv_cache_dtype: str | None, device: torch.device | str | None) -> None:
        self.dtype = dtype
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.k = torch.zeros(shape, dtype=code_dtype(kv_cache_dtype, dtype), device=device)
        self.v = torch.zeros_like(self.k)
        scaled = self.kv_cache_dtype is KVCacheDtype.INT8
        self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.k.device) if scaled else None
        self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=self.k.device) if scaled else None

    def _store(self, first: torch.Tensor, second: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write vectors k, v `[N, Hkv, D]` at (first[n], :, second[n]), quantized as this cache stores them."""
        for codes, scales, new in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if self.kv_cache_dtype is None:
                codes[first, :, second] = new.to(codes.dtype)
                continue
            new_codes, new_scale = quantize_kv(new, self.kv_cache_dtype)
            codes[first, :, second] = new_codes
            if scales is not None and new_scale is not None:
                scales[first, :, second] = new_scale

    def _values(self, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V in `dtype` from codes read out of this cache (and the scales read alongside)."""
        if self.kv_cache_dtype is None:
            return k, v
        return dequantize_kv(k, k_scale, self.dtype), dequantize_kv(v, v_scale, self.dtype)

    def round_trip(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New K, V `[B, Hkv, S, D]` as this cache gives them back once stored (themselves when not quantized):
        what a decode step's queries read for their own tokens, on every path."""
        if self.kv_cache_dtype is None:
            return k, v
        return dequantize_kv(*quantize_kv(k, self.kv_cache_dtype), self.dtype), dequantize_kv(*quantize_kv(v, self.kv_cache_dtype), self.dtype)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def zero(self, index: torch.Tensor | int) -> None:
        """Empty K, V (and scales) at `index` along the first dim: exact zeros, whatever was there."""
        for t in self._tensors():
            _bytes(t)[index] = 0

    def copy_entry(self, source: int, target: int, keep: torch.Tensor) -> None:
        """Copy entry `source` to `target` along the first dim, zeroing the slots (dim 1 of what
        remains, `keep [Y]` False) the copy leaves empty."""
        for t in self._tensors():
            mask = keep.view(1, -1, *(1,) * (t.dim() - 3))  # entries are [Hkv, Y, D] (codes) or [Hkv, Y] (scales)
            _bytes(t)[target] = torch.where(mask, _bytes(t)[source], 0)

    def memory_bytes(self) -> int:
        """Bytes this layer's K, V (and scales) hold."""
        return sum(t.numel() * t.element_size() for t in self._tensors())


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A one-byte code tensor as uint8 (float8 has no fill or select kernels on the CPU), others as they are."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


