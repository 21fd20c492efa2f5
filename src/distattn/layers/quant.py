"""Weight formats: one enum, pure quantization math, and one product per format.

A linear layer (and the MoE experts) hold their weight in one `WeightFormat`:
DENSE (`F.linear`), PACKED (oneDNN's blocked layout, CPU), INT8 (symmetric per output
row, NxDI's `per_channel_symmetric`), INT4 (a bf16 scale and zero per group of inputs).
The products below take the tensors of one format explicitly, so a layer and an expert
run the same code: quantized kernels for a decode step's few rows (bf16 activations, as
PyTorch's int8 / int4 kernels take them), dequantized products for prefill.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
from torch.nn import functional as F

from ..parallel.comm import Group, all_reduce_max


class WeightFormat(str, enum.Enum):
    """How a layer holds its weight (compares equal to its name: `WeightFormat.INT8 == "int8"`)."""

    DENSE = "dense"
    PACKED = "packed"
    INT8 = "int8"
    INT4 = "int4"

    def __str__(self) -> str:
        return self.value


def weight_format(kind: str) -> WeightFormat:
    """A quantized format by name ("int8" / "int4"); ValueError otherwise."""
    if kind not in (WeightFormat.INT8.value, WeightFormat.INT4.value):
        raise ValueError(f"quantize={kind!r}: distattn quantizes weights to 'int8' or 'int4'")
    return WeightFormat(kind)


# oneDNN picks its blocking for this many rows; products of any other size still run on it
PACK_ROWS = 8
# int8 / int4 weights: up to this many rows use PyTorch's quantized x bf16 kernels (a decode step's rows); more
# rows (prefill) dequantize the weight and run the usual product, which is faster there
KERNEL_ROWS = 16
INT4_GROUP = 32


def group_reason(width: int, group_size: int = 32) -> str | None:
    """None when `width` inputs split into int4 groups of `group_size`, else why not."""
    if group_size not in (32, 64, 128, 256) or width % group_size:
        return f"group_size={group_size} must be 32, 64, 128 or 256 and divide the {width} inputs"
    return None



def int8_rows(weight: torch.Tensor, scale_group: Group = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of `weight` `[..., out, in]`: codes `[..., out, in]` and fp32 scales `[..., out]`,
    each row's max |w| / 127 (over `scale_group` when this rank holds only part of each row)."""
    peak = all_reduce_max(weight.abs().amax(dim=-1).float(), scale_group)
    scale = (peak / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(weight.float() / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale



def int4_groups(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 of `weight` `[out, in]` per `group_size` inputs: codes `[out, in]` (uint8, 0..15) and
    bf16 (scale, zero) `[in / group_size, out, 2]` with w = (code - 8) * scale + zero (PyTorch's int4 layout)."""
    out, width = weight.shape
    groups = weight.float().reshape(out, width // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).reshape(out, width).to(torch.uint8)
    return codes, torch.stack([scale.T, (low + 8 * scale).T], dim=-1).to(torch.bfloat16).contiguous()



def int4_kernel_layout(codes: torch.Tensor) -> torch.Tensor | None:
    """PyTorch's CPU int4 layout of codes `[out, in]` for the decode kernel; None when out is not a multiple of 16
    (the kernel's tile: such a shard uses the dequantized product)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1) if codes.shape[0] % 16 == 0 else None



def int4_dequantize(codes: torch.Tensor, scale_zero: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight `[..., out, in]` (dtype) from int4 codes `[..., out, in]` and (scale, zero) `[..., groups, out, 2]`."""
    *lead, out, width = codes.shape
    grouped = codes.to(dtype).reshape(*lead, out, width // group_size, group_size)
    sz = scale_zero.to(dtype).transpose(-3, -2)  # [..., out, groups, 2]
    return ((grouped - 8) * sz[..., :1] + sz[..., 1:]).reshape(*lead, out, width)



def pack_reason(weight: torch.Tensor) -> str | None:
    """None when `pack()` can hold this weight in oneDNN's layout, else why not."""
    if weight.device.type != "cpu":
        return f"packed weights are a CPU layout; this weight is on {weight.device}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN packs float32 and bfloat16 weights, not {weight.dtype}"
    return None



def _kernel_rows(x: torch.Tensor, bias: torch.Tensor | None, kernel: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """A quantized kernel on a decode step's few rows (bf16 activations, as PyTorch's int8 / int4 kernels take
    them), or None for more rows (prefill) or off the CPU, where a dequantized product is faster, and for fp64
    activations (verification runs: bf16 would discard their precision)."""
    rows = x.numel() // x.shape[-1]
    if rows > KERNEL_ROWS or x.device.type != "cpu" or x.dtype == torch.float64:  # fp64: keep its precision
        return None
    y = kernel(x.reshape(rows, x.shape[-1]).to(torch.bfloat16)).to(x.dtype)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


@torch.library.custom_op("distattn::weight_int8_mm", mutates_args=())
def weight_int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`aten._weight_int8pack_mm` as an op of its own: x `[M, K]` bf16, codes `[N, K]` int8, scale `[N]` bf16 ->
    `[M, N]`. torch.compile calls it as it is (Inductor's own lowering of the aten op cannot take a fused input)."""
    return torch.ops.aten._weight_int8pack_mm(x, codes, scale)


@weight_int8_mm.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def int8_product(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (codes * scale)^T (+ bias), codes `[out, in]` int8, scale `[out]`: the int8 kernel for few rows, a dequantized product for many."""
    mm = weight_int8_mm if torch.compiler.is_compiling() else torch.ops.aten._weight_int8pack_mm  # eager: no extra dispatch
    y = _kernel_rows(x, bias, lambda flat: mm(flat, codes, scale.to(torch.bfloat16)))
    return y if y is not None else F.linear(x, codes.to(x.dtype) * scale.to(x.dtype)[:, None], bias)


def int4_product(
    x: torch.Tensor, kernel: torch.Tensor | None, codes: torch.Tensor, scale_zero: torch.Tensor, group: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x W^T (+ bias) with W = (code - 8) * scale + zero per group: the int4 kernel (`kernel`: PyTorch's layout, or None)
    for few rows, a dequantized product for many."""
    y = None if kernel is None else _kernel_rows(
        x, bias, lambda flat: torch.ops.aten._weight_int4pack_mm_for_cpu(flat, kernel, group, scale_zero))
    if y is not None:
        return y
    return F.linear(x, int4_dequantize(codes, scale_zero, group, x.dtype), bias)


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) with W in oneDNN's blocked layout."""
    if x.dtype != packed.dtype:
        raise ValueError(f"input is {x.dtype} but the packed weight is {packed.dtype}; cast the input, or pack again after .to()")
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` `[out, in]` in oneDNN's blocked layout; ValueError where it cannot (`pack_reason`)."""
    reason = pack_reason(weight)
    if reason is not None:
        raise ValueError(f"cannot pack this layer: {reason}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)
