"""Column- and row-parallel linear layers (NxDI / Megatron semantics).

Both take global sizes and hold this rank's shard. `load_full(weight, bias)` cuts the
shard out of a full checkpoint tensor (contiguous split); layers whose shards follow
a HeadLayout load pre-cut tensors with `load_shard`.

Inference layout: `pack()` (see `pack_reason`) keeps the weight only in oneDNN's blocked
layout, which streams 1.5-2x faster than `F.linear` for the few rows of a decode step
(and for bf16 products of any size) on this CPU; `weight` then stays a placeholder of
the right shape, dtype and device (no data), `state_dict()` returns the dense weight and
`load_shard` packs the new one. Call it after moving or casting the module.

Multi-LoRA: `set_lora(lora_a, lora_b)` gives a layer stacked adapter halves and
`forward(x, adapter_ids)` adds each row's adapter (`distattn.lora.lora_delta`). A
column-parallel layer holds A whole and B's rows of its output shard; a row-parallel
layer holds A's columns of its input shard and B whole, and adds its partial delta
before the all-reduce, so the sum over ranks is the full x A^T B^T.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..lora import lora_delta
from .comm import Group, all_gather_last_dim, all_reduce_max, all_reduce_sum, group_rank, group_size

FUSED_GATHER_ERROR = "Gathering states followed by fused qkv is not allowed as it has a different weight sharding scheme"


def _split(total: int, parts: int, name: str) -> int:
    if total % parts:
        raise ValueError(f"{name}={total} does not divide by the tensor-parallel size {parts}")
    return total // parts


class _PackableLinear(nn.Module):
    """What both parallel linears share: the packed inference layout of their weight."""

    weight: nn.Parameter
    packed: torch.Tensor | None

    def pack(self) -> None:
        """Keep the weight in oneDNN's blocked layout only (see the module docstring); ValueError if it cannot."""
        _pack(self)

    @torch.no_grad()
    def quantize_int8(self, scale_group: Group = None) -> None:
        """Hold the weight as int8 with one symmetric scale per output row (NxDI's `per_channel_symmetric`).

        scale = max |w| over the whole row / 127, taken over `scale_group` when this rank holds only part
        of each row (row-parallel), so every layout quantizes alike; `weight` becomes a placeholder.
        """
        weight = self.packed.to_dense() if self.packed is not None else self.weight.detach()
        if not weight.dtype.is_floating_point or weight.numel() == 0 or 0 in weight.stride():
            raise ValueError("quantize_int8 needs this layer's floating-point weight (quantize before packing, once)")
        self.qweight, scale = int8_rows(weight, scale_group)
        self.qscale = scale.to(weight.dtype)
        self.packed = None
        self.weight = nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape), requires_grad=False)

    @torch.no_grad()
    def quantize_int4(self, group_size: int = 32) -> None:
        """Hold the weight as 4-bit codes with a bf16 scale and zero per `group_size` inputs of each row
        (w = (code - 8) * scale + zero): PyTorch's int4 layout for decode rows, plus the codes as bytes for
        prefill's dequantized product. Groups never cross ranks (each rank's inputs are whole groups)."""
        weight = self.packed.to_dense() if self.packed is not None else self.weight.detach()
        if not weight.dtype.is_floating_point or weight.numel() == 0 or 0 in weight.stride():
            raise ValueError("quantize_int4 needs this layer's floating-point weight (quantize before packing, once)")
        out, width = weight.shape
        reason = group_reason(width, group_size)
        if reason is not None:
            raise ValueError(f"cannot hold this layer in int4: {reason}")
        codes, self.q4_scale_zero = int4_groups(weight, group_size)
        self.q4 = int4_kernel_layout(codes)
        self.q4_codes = codes
        self.q4_group = group_size
        self.packed = None
        self.weight = nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape), requires_grad=False)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed is not None:
            destination[prefix + "weight"] = self.packed.to_dense()
        if getattr(self, "qweight", None) is not None or getattr(self, "q4_codes", None) is not None:  # the codes and scales stand for it
            destination.pop(prefix + "weight", None)


class ColumnParallelLinear(_PackableLinear):
    """y = x W^T + b with W's output rows split across the group.

    Input `[..., in_features]` (replicated); output `[..., out_features / tp]`, or the
    full `[..., out_features]` with `gather_output=True`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        gather_output: bool = False,
        group: Group = None,
        fused_qkv: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if fused_qkv and gather_output:
            raise ValueError(FUSED_GATHER_ERROR)
        self.group = group
        self.gather_output = gather_output
        self.out_features = out_features
        local = _split(out_features, group_size(group), "out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype, device=device)) if bias else None
        nn.init.normal_(self.weight, std=in_features**-0.5)
        _no_lora(self)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x `[B, S, in]`, adapter_ids `[B]` (-1: no adapter) -> `[B, S, out / tp]` (or gathered)."""
        y = _linear(self, x, self.bias)
        if adapter_ids is not None and self.lora_a is not None:
            y = y + lora_delta(x, self.lora_a, self.lora_b, adapter_ids)
        return all_gather_last_dim(y, self.group) if self.gather_output else y

    def set_lora(self, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None) -> None:
        """Adapters: lora_a `[N + 1, r, in]`, lora_b `[N + 1, out / tp, r]` (scale folded in, slot N zero); None removes them."""
        _set_lora(self, lora_a, lora_b, (self.weight.shape[1], self.weight.shape[0]))

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Keep this rank's contiguous block of output rows of full `[out, in]` / `[out]` tensors."""
        rows = slice(group_rank(self.group) * self.weight.shape[0], (group_rank(self.group) + 1) * self.weight.shape[0])
        self.load_shard(weight[rows], None if bias is None else bias[rows])

    @torch.no_grad()
    def load_shard(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy this rank's pre-cut weight (and bias); ValueError when a shape differs."""
        _load_weight(self, weight)
        if self.bias is not None:
            _copy(self.bias, bias, "bias")


class RowParallelLinear(_PackableLinear):
    """y = all_reduce(x_r W_r^T) + b with W's input columns split across the group.

    Input `[..., in_features / tp]` (`input_is_parallel=True`) or the full
    `[..., in_features]`, of which this rank takes its slice. Output `[..., out_features]`
    on every rank; the bias is added once, after the reduction.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        input_is_parallel: bool = True,
        group: Group = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.in_features = in_features
        local = _split(in_features, group_size(group), "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, local, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        nn.init.normal_(self.weight, std=in_features**-0.5)
        _no_lora(self)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x `[B, S, in / tp]` (or `[B, S, in]`), adapter_ids `[B]` (-1: no adapter) -> `[B, S, out]`."""
        if not self.input_is_parallel:
            local = self.weight.shape[1]
            x = x[..., group_rank(self.group) * local : (group_rank(self.group) + 1) * local]
        y = _linear(self, x, None)
        if adapter_ids is not None and self.lora_a is not None:
            y = y + lora_delta(x, self.lora_a, self.lora_b, adapter_ids)  # partial, like x_r W_r^T
        y = all_reduce_sum(y, self.group)
        return y if self.bias is None else y + self.bias

    def set_lora(self, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None) -> None:
        """Adapters: lora_a `[N + 1, r, in / tp]`, lora_b `[N + 1, out, r]` (scale folded in, slot N zero); None removes them."""
        _set_lora(self, lora_a, lora_b, (self.weight.shape[1], self.weight.shape[0]))

    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Keep this rank's contiguous block of input columns of a full `[out, in]` weight."""
        local = self.weight.shape[1]
        cols = slice(group_rank(self.group) * local, (group_rank(self.group) + 1) * local)
        self.load_shard(weight[:, cols], bias)

    @torch.no_grad()
    def load_shard(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy this rank's pre-cut weight (and bias); ValueError when a shape differs."""
        _load_weight(self, weight)
        if self.bias is not None:
            _copy(self.bias, bias, "bias")


def _no_lora(layer: nn.Module) -> None:
    # not part of state_dict: adapters are loaded separately from the base weights
    layer.register_buffer("lora_a", None, persistent=False)
    layer.register_buffer("lora_b", None, persistent=False)
    layer.packed = None  # the weight in oneDNN's layout, once packed
    layer.register_buffer("qweight", None)  # int8 [out, in / tp] and per-row scales, once quantized (quantize_int8)
    layer.register_buffer("qscale", None)
    layer.register_buffer("q4", None)  # int4: PyTorch's packed layout, the codes, bf16 (scale, zero) per group (quantize_int4)
    layer.register_buffer("q4_codes", None)
    layer.register_buffer("q4_scale_zero", None)
    layer.q4_group = 0


# oneDNN picks its blocking for this many rows; products of any other size still run on it
_PACK_ROWS = 8


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


def int4_reason(layer: nn.Module) -> str | None:
    """None when `quantize_weights('int4')` holds this parallel linear in int4, else why it stays in float.

    Decided on the whole layer's outputs, so every tensor-parallel degree quantizes the same layers:
    a multiple of 16 (the int4 kernel's tile; a shard with fewer rows uses the dequantized product).
    Inputs that do not split into whole groups are an error (`int4_group_error`), not a reason."""
    total_out = getattr(layer, "out_features", layer.weight.shape[0])  # a column-parallel layer's whole output
    if total_out % 16:
        return f"the int4 layout needs a multiple of 16 outputs, this layer has {total_out}"
    return None


def int4_group_error(layer: nn.Module, name: str, group_size: int = 32) -> str | None:
    """Why this layer's inputs (this rank's share under tensor parallelism) cannot be int4 groups, or None."""
    width = layer.weight.shape[1]
    total = getattr(layer, "in_features", width)  # a row-parallel layer's whole input
    if total % group_size:
        return f"{name} has {total} inputs, not a multiple of the int4 group size {group_size}"
    if width % group_size:
        return (f"{name}'s {total} inputs split into {width} per tensor-parallel rank, not whole int4 groups of {group_size} "
                "(a group would span two ranks)")
    return None


def pack_reason(weight: torch.Tensor) -> str | None:
    """None when `pack()` can hold this weight in oneDNN's layout, else why not."""
    if weight.device.type != "cpu":
        return f"packed weights are a CPU layout; this weight is on {weight.device}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN packs float32 and bfloat16 weights, not {weight.dtype}"
    return None


def _pack(layer: nn.Module) -> None:
    weight = layer.packed.to_dense() if layer.packed is not None else layer.weight.detach()
    reason = pack_reason(weight)
    if reason is not None:
        raise ValueError(f"cannot pack this layer: {reason}")
    layer.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_ROWS)
    placeholder = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)  # shape, dtype, device; no data
    layer.weight = nn.Parameter(placeholder, requires_grad=False)


def _load_weight(layer: nn.Module, value: torch.Tensor | None) -> None:
    if getattr(layer, "qweight", None) is not None or getattr(layer, "q4_codes", None) is not None:
        raise ValueError("this layer holds quantized weights: load the floating-point weights before quantizing")
    if layer.packed is None:
        _copy(layer.weight, value, "weight")
        return
    if value is None or value.shape != layer.weight.shape:
        raise ValueError(f"weight: got {None if value is None else list(value.shape)}, this rank's shard is {list(layer.weight.shape)}")
    layer.packed = torch.ops.mkldnn._reorder_linear_weight(value.to(layer.weight.dtype).contiguous(), _PACK_ROWS)


# int8 weights: up to this many rows use PyTorch's int8 x bf16 kernel (a decode step's rows); more rows
# (prefill) dequantize the weight and run the usual product, which is faster there
_INT8_KERNEL_ROWS = 16


def _kernel_rows(x: torch.Tensor, bias: torch.Tensor | None, kernel: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """A quantized kernel on a decode step's few rows (bf16 activations, as PyTorch's int8 / int4 kernels take
    them), or None for more rows (prefill) or off the CPU, where a dequantized product is faster, and for fp64
    activations (verification runs: bf16 would discard their precision)."""
    rows = x.numel() // x.shape[-1]
    if rows > _INT8_KERNEL_ROWS or x.device.type != "cpu" or x.dtype == torch.float64:  # fp64: keep its precision
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


def _int8_linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (w_int8 * scale)^T (+ bias): the int8 kernel for few rows, a dequantized product for many."""
    mm = weight_int8_mm if torch.compiler.is_compiling() else torch.ops.aten._weight_int8pack_mm  # eager: no extra dispatch
    y = _kernel_rows(x, bias, lambda flat: mm(flat, layer.qweight, layer.qscale.to(torch.bfloat16)))
    return y if y is not None else F.linear(x, layer.qweight.to(x.dtype) * layer.qscale.to(x.dtype)[:, None], bias)


def _int4_linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) with W = (code - 8) * scale + zero per group: the int4 kernel for few rows, a dequantized product for many."""
    y = None if layer.q4 is None else _kernel_rows(
        x, bias, lambda flat: torch.ops.aten._weight_int4pack_mm_for_cpu(flat, layer.q4, layer.q4_group, layer.q4_scale_zero))
    if y is not None:
        return y
    return F.linear(x, int4_dequantize(layer.q4_codes, layer.q4_scale_zero, layer.q4_group, x.dtype), bias)


def _linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) through the packed, int8 or int4 weight when there is one."""
    if getattr(layer, "qweight", None) is not None:
        return _int8_linear(layer, x, bias)
    if getattr(layer, "q4_codes", None) is not None:
        return _int4_linear(layer, x, bias)
    if layer.packed is None:
        return F.linear(x, layer.weight, bias)
    if x.dtype != layer.packed.dtype:
        raise ValueError(f"input is {x.dtype} but the packed weight is {layer.packed.dtype}; cast the input, or pack again after .to()")
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), layer.packed, bias, "none", [], "")


def _set_lora(layer: nn.Module, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, in_out: tuple[int, int]) -> None:
    if lora_a is not None and lora_b is not None:
        slots, rank, width = lora_a.shape
        if (width, lora_b.shape[1]) != in_out or lora_b.shape[0] != slots or lora_b.shape[2] != rank:
            raise ValueError(f"lora_a {list(lora_a.shape)} / lora_b {list(lora_b.shape)} do not fit this layer's shard (in, out) = {in_out}")
        lora_a, lora_b = lora_a.to(layer.weight), lora_b.to(layer.weight)
    layer.lora_a, layer.lora_b = lora_a, lora_b


def _copy(param: torch.Tensor, value: torch.Tensor | None, name: str) -> None:
    if value is None or value.shape != param.shape:
        got = None if value is None else list(value.shape)
        raise ValueError(f"{name}: got {got}, this rank's shard is {list(param.shape)}")
    param.copy_(value)
