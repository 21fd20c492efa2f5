"""MXFP4 expert weights (gpt-oss checkpoints): 4-bit e2m1 values in blocks of 32 sharing a power-of-two scale.

A tensor `name` is stored as `name_blocks` `[E, out, in / 32, 16]` uint8 (two values per byte, the
low nibble first) and `name_scales` `[E, out, in / 32]` uint8 (exponent + 127). Dequantized it is
`[E, in, out]`, the layout of the dense tensor a dequantized checkpoint holds. Loaded by
dequantizing to the model's dtype (exact: every e2m1 value times a power of two is a bf16 number).
"""

from __future__ import annotations

from typing import Any

import torch

# e2m1: sign, 2 exponent bits, 1 mantissa bit
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks `[E, out, G, 16]` uint8, scales `[E, out, G]` uint8 -> `[E, G * 32, out]` in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} {blocks.dtype} / scales {list(scales.shape)} {scales.dtype}: "
                         "expected uint8 [..., G, 16] and uint8 [..., G]")
    table = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    values = torch.stack([table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]], dim=-1)  # [E, out, G, 16, 2]
    values = values.flatten(-2) * torch.exp2(scales.float() - 127).unsqueeze(-1)  # [E, out, G, 32]
    return values.flatten(-2).transpose(1, 2).to(dtype)  # [E, in, out]


def read_experts(source: Any, name: str, dtype: torch.dtype, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
    """Expert tensor `name` `[E, in, out]` in `dtype`, dense or from its MXFP4 blocks; with `dim` (1: in,
    2: out) only [start, stop) along it (an MXFP4 `in` range is read in whole blocks of 32)."""
    if name in source.shapes():
        return source.read(name) if dim is None else source.read(name, dim, start, stop)
    blocks_name, scales_name = name + "_blocks", name + "_scales"
    if dim == 2:  # out rows of the blocks
        blocks, scales = source.read(blocks_name, 1, start, stop), source.read(scales_name, 1, start, stop)
        return dequantize_mxfp4(blocks, scales, dtype)
    if dim == 1:  # in: block groups
        first, last = start // 32, -(-stop // 32)
        blocks, scales = source.read(blocks_name, 2, first, last), source.read(scales_name, 2, first, last)
        return dequantize_mxfp4(blocks, scales, dtype)[:, start - first * 32 : stop - first * 32]
    return dequantize_mxfp4(source.read(blocks_name), source.read(scales_name), dtype)
