"""Quantized KV cache entries: the codes a cache stores for one key or value vector, and back.

Two schemes, chosen per cache (`kv_cache_dtype`):

- "fp8": float8 e4m3 by direct cast, as NxDI's `kv_cache_quant` stores it: finite values
  saturate at +-448, a NaN or Inf becomes NaN (a row's own non-finite numbers stay visible as
  such, never a plausible 448). 1 byte per element, no scale: 0.25x the fp32 cache.
- "int8": symmetric int8 with one fp32 scale per (token, kv head), absmax / 127, so every head
  of every token uses the whole code range and no calibration is needed. 1 byte per element +
  4 bytes per head_dim elements (head_dim 128: 0.258x the fp32 cache, 0.52x bf16).

Empty slots hold code 0 (and scale 0): they dequantize to exact zeros.
"""

from __future__ import annotations

import enum

import torch


class KVCacheDtype(str, enum.Enum):
    """How a KV cache stores K and V (compares equal to its name: `KVCacheDtype.FP8 == "fp8"`)."""

    FP8 = "fp8"
    INT8 = "int8"

    def __str__(self) -> str:
        return self.value


KV_CACHE_DTYPES = tuple(d.value for d in KVCacheDtype)
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value
INT8_MAX = 127  # symmetric: codes in [-127, 127]


def check_kv_cache_dtype(kv_cache_dtype: str | None) -> KVCacheDtype | None:
    """The scheme, or ValueError naming kv_cache_dtype and the choices (and a torch without float8)."""
    if kv_cache_dtype is None:
        return None
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is unknown: pass None (the model's dtype) or one of {list(KV_CACHE_DTYPES)}")
    scheme = KVCacheDtype(kv_cache_dtype)
    if scheme is KVCacheDtype.FP8 and not hasattr(torch, "float8_e4m3fn"):  # older torch builds have no float8 type
        raise ValueError(f"kv_cache_dtype='fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks; "
                         "install torch>=2.1 or use kv_cache_dtype='int8'")
    return scheme


def code_dtype(kv_cache_dtype: str | None, dtype: torch.dtype) -> torch.dtype:
    """The element type a cache stores: `dtype` itself when not quantized."""
    if kv_cache_dtype is None:
        return dtype
    return torch.float8_e4m3fn if kv_cache_dtype == KVCacheDtype.FP8 else torch.int8


def quantize_kv(x: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes of vectors x `[..., D]`: (codes `[..., D]`, scale `[...]` fp32 for int8, None for fp8)."""
    if kv_cache_dtype == KVCacheDtype.FP8:
        saturated = torch.where(torch.isfinite(x), x.clamp(-FP8_MAX, FP8_MAX), torch.full_like(x, float("nan")))
        return saturated.to(torch.float8_e4m3fn), None
    acc = torch.promote_types(x.dtype, torch.float32)
    x = x.to(acc)
    scale = x.abs().amax(dim=-1) / INT8_MAX  # [...]: NaN or Inf where the vector is not finite
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)  # a zero vector: codes 0
    codes = torch.round(x / divisor).clamp(-INT8_MAX, INT8_MAX)
    codes = torch.where(torch.isfinite(codes), codes, torch.zeros_like(codes)).to(torch.int8)  # its scale carries the NaN
    return codes, scale.float()


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Vectors `[..., D]` in `dtype` from codes `[..., D]` and, for int8, their scale `[...]`."""
    if scale is None:
        return codes.to(dtype)
    return (codes.to(torch.promote_types(dtype, torch.float32)) * scale.unsqueeze(-1)).to(dtype)
