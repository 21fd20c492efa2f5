"""Column- and row-parallel linear layers (NxDI / Megatron semantics).

Both take global sizes and hold this rank's shard. `load_full(weight, bias)` cuts the
shard out of a full checkpoint tensor (contiguous split); layers whose shards follow
a HeadLayout load pre-cut tensors with `load_shard`.

Inference layout: `pack()` (see `pack_reason`) keeps the weight only in oneDNN's blocked
layout, which streams 1.5-2x faster than `F.linear` for the few rows of a decode step
(and for bf16 products of any size) on this CPU; `weight` then stays a placeholder of
the right shape, dtype and device (no data), `state_dict()` returns the dense weight and
`load_shard` packs the new one. Moving or casting the module (`.to()`, `.cuda()`, `.double()`)
unpacks the weight, converts it, and packs it again where the new one can be (`pack_reason`):
a model moved to a GPU or cast to float64 holds plain weights.

Multi-LoRA: `set_lora(lora_a, lora_b)` gives a layer stacked adapter halves and
`forward(x, adapter_ids)` adds each row's adapter (`distattn.lora.lora_delta`). A
column-parallel layer holds A whole and B's rows of its output shard; a row-parallel
layer holds A's columns of its input shard and B whole, and adds its partial delta
before the all-reduce, so the sum over ranks is the full x A^T B^T.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..parallel.comm import Group, HeldWeakly, all_gather_last_dim, all_reduce_sum, group_rank, group_size
from .lora import lora_delta
from .quant import (
    INT4_GROUP,
    WeightFormat,
    group_reason,
    int4_groups,
    int4_kernel_layout,
    int4_product,
    int8_product,
    int8_rows,
    pack,
    pack_reason,
    packed_product,
)

_SKIP_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("distattn_skip_weight_init", default=False)


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Layers built inside leave their weights uninitialised (a loader overwrites every one): no random init, which
    costs seconds at billions of parameters."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


def initialise_weights() -> bool:
    """Whether layers built now draw random initial weights (not inside `skip_weight_init`)."""
    return not _SKIP_INIT.get()


FUSED_GATHER_ERROR = "Gathering states followed by fused qkv is not allowed as it has a different weight sharding scheme"


def _split(total: int, parts: int, name: str) -> int:
    if total % parts:
        raise ValueError(f"{name}={total} does not divide by the tensor-parallel size {parts}")
    return total // parts


class ParallelLinear(nn.Module):
    """What both parallel linears share: the weight held in one `WeightFormat`.

    DENSE: `weight`. PACKED: `packed` (oneDNN's layout). INT8: `qweight` `[out, in]` and `qscale` `[out]`.
    INT4: `q4` (PyTorch's kernel layout, or None), `q4_codes` `[out, in]`, `q4_scale_zero` `[groups, out, 2]`.
    Off DENSE, `weight` is a placeholder with the shape, dtype and device (no data)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    in_features: int  # the whole layer's, on every rank
    out_features: int
    group = HeldWeakly()  # the tensor-parallel group (torch.distributed owns it)
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    packed: torch.Tensor | None
    weight_format: WeightFormat
    qweight: torch.Tensor
    qscale: torch.Tensor
    q4: torch.Tensor | None
    q4_codes: torch.Tensor
    q4_scale_zero: torch.Tensor
    q4_group: int

    def _start(self) -> None:
        # not part of state_dict: adapters are loaded separately from the base weights
        self.register_buffer("lora_a", None, persistent=False)
        self.register_buffer("lora_b", None, persistent=False)
        self.packed = None  # the weight in oneDNN's layout, once packed
        self.weight_format = WeightFormat.DENSE
        self.adopts_loads = False  # see adopt_loads

    def pack(self) -> None:
        """Keep the weight in oneDNN's blocked layout only (see the module docstring); ValueError if it cannot."""
        weight = self._float_weight("pack")
        self.packed = pack(weight)
        self._placeholder(weight, WeightFormat.PACKED)

    def adopt_loads(self, enable: bool) -> None:
        """While enabled, a loaded weight becomes the parameter's storage instead of being copied into it: for a
        loader whose every tensor is fresh (read from a file for this layer alone), never for a caller's tensors."""
        self.adopts_loads = enable

    def pack_as_loaded(self) -> None:
        """Hold the weight in oneDNN's layout from the next `load_shard` on, packing each weight as it arrives (a
        loader's fresh model: no dense copy is ever filled). ValueError where it cannot be packed."""
        reason = pack_reason(self.weight)
        if reason is not None:
            raise ValueError(f"cannot pack this layer: {reason}")
        self.packed = torch.empty(0, dtype=self.weight.dtype)  # replaced by the first load
        self._placeholder(self.weight, WeightFormat.PACKED)

    @torch.no_grad()
    def quantize_int8(self, scale_group: Group = None) -> None:
        """Hold the weight as int8 with one symmetric scale per output row (NxDI's `per_channel_symmetric`).

        scale = max |w| over the whole row / 127, taken over `scale_group` when this rank holds only part
        of each row (row-parallel), so every layout quantizes alike; `weight` becomes a placeholder.
        """
        weight = self._float_weight("quantize_int8")
        codes, scale = int8_rows(weight, scale_group)
        self.register_buffer("qweight", codes)
        self.register_buffer("qscale", scale.to(weight.dtype))
        self._placeholder(weight, WeightFormat.INT8)

    @torch.no_grad()
    def quantize_int4(self, group_size: int = INT4_GROUP) -> None:
        """Hold the weight as 4-bit codes with a bf16 scale and zero per `group_size` inputs of each row
        (w = (code - 8) * scale + zero): PyTorch's int4 layout for decode rows, plus the codes as bytes for
        prefill's dequantized product. Groups never cross ranks (each rank's inputs are whole groups)."""
        weight = self._float_weight("quantize_int4")
        reason = group_reason(weight.shape[1], group_size)
        if reason is not None:
            raise ValueError(f"cannot hold this layer in int4: {reason}")
        codes, scale_zero = int4_groups(weight, group_size)
        self.register_buffer("q4", int4_kernel_layout(codes))
        self.register_buffer("q4_codes", codes)
        self.register_buffer("q4_scale_zero", scale_zero)
        self.q4_group = group_size
        self._placeholder(weight, WeightFormat.INT4)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ParallelLinear:
        """Module conversions (`.to()`, `.cuda()`, `.double()`, ...) on a packed weight: unpack, convert, and
        pack again where the converted weight can be packed (see the module docstring)."""
        if self.weight_format is not WeightFormat.PACKED:
            return super()._apply(fn, recurse)
        self.weight = nn.Parameter(self._float_weight("converting"), requires_grad=False)
        self.packed, self.weight_format = None, WeightFormat.DENSE
        super()._apply(fn, recurse)
        if pack_reason(self.weight) is None:
            self.pack()
        return self

    def _float_weight(self, action: str) -> torch.Tensor:
        """The dense floating-point weight (unpacked when packed); ValueError when it is held quantized already."""
        weight = self.packed.to_dense() if self.packed is not None else self.weight.detach()
        quantized = self.weight_format in (WeightFormat.INT8, WeightFormat.INT4)
        if quantized or not weight.dtype.is_floating_point or weight.numel() == 0 or 0 in weight.stride():
            raise ValueError(f"{action} needs this layer's floating-point weight (quantize before packing, once)")
        return weight

    def _placeholder(self, weight: torch.Tensor, held: WeightFormat) -> None:
        """`weight` becomes a placeholder (shape, dtype, device; no data): the weight is held as `held`."""
        if held is not WeightFormat.PACKED:
            self.packed = None
        self.weight = nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape), requires_grad=False)
        self.weight_format = held

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias) through the weight as held."""
        held = self.weight_format
        if held is WeightFormat.INT8:
            return int8_product(x, self.qweight, self.qscale, bias)
        if held is WeightFormat.INT4:
            return int4_product(x, self.q4, self.q4_codes, self.q4_scale_zero, self.q4_group, bias)
        if held is WeightFormat.PACKED:
            assert self.packed is not None  # held PACKED
            return packed_product(x, self.packed, bias)
        return F.linear(x, self.weight, bias)

    @torch.no_grad()
    def _load_weight(self, value: torch.Tensor | None) -> None:
        if self.weight_format in (WeightFormat.INT8, WeightFormat.INT4):
            raise ValueError("this layer holds quantized weights: load the floating-point weights before quantizing")
        if self.packed is None and self.adopts_loads and value is not None and value.shape == self.weight.shape:
            self.weight.data = value.to(device=self.weight.device, dtype=self.weight.dtype).contiguous()  # no second copy
            return
        if self.packed is None:
            _copy(self.weight, value, "weight")
            return
        if value is None or value.shape != self.weight.shape:
            raise ValueError(f"weight: got {None if value is None else list(value.shape)}, this rank's shard is {list(self.weight.shape)}")
        self.packed = pack(value.to(self.weight.dtype))

    def set_lora(self, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None) -> None:
        """Adapters: lora_a `[N + 1, r, in]`, lora_b `[N + 1, out, r]` over this rank's shard (scale folded in,
        slot N zero); None removes them."""
        in_out = (self.weight.shape[1], self.weight.shape[0])
        if lora_a is not None and lora_b is not None:
            slots, rank, width = lora_a.shape
            if (width, lora_b.shape[1]) != in_out or lora_b.shape[0] != slots or lora_b.shape[2] != rank:
                raise ValueError(f"lora_a {list(lora_a.shape)} / lora_b {list(lora_b.shape)} do not fit this layer's shard (in, out) = {in_out}")
            lora_a, lora_b = lora_a.to(self.weight), lora_b.to(self.weight)
        self.lora_a, self.lora_b = lora_a, lora_b

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed is not None:
            destination[prefix + "weight"] = self.packed.to_dense()
        if self.weight_format in (WeightFormat.INT8, WeightFormat.INT4):  # the codes and scales stand for it
            destination.pop(prefix + "weight", None)


class ColumnParallelLinear(ParallelLinear):
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
        self.in_features, self.out_features = in_features, out_features
        local = _split(out_features, group_size(group), "out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype, device=device)) if bias else None
        if initialise_weights():
            nn.init.normal_(self.weight, std=in_features**-0.5)
        self._start()

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x `[B, S, in]`, adapter_ids `[B]` (-1: no adapter) -> `[B, S, out / tp]` (or gathered)."""
        y = self.product(x, self.bias)
        if adapter_ids is not None and self.lora_a is not None and self.lora_b is not None:
            y = y + lora_delta(x, self.lora_a, self.lora_b, adapter_ids)
        return all_gather_last_dim(y, self.group) if self.gather_output else y


    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Keep this rank's contiguous block of output rows of full `[out, in]` / `[out]` tensors."""
        rows = slice(group_rank(self.group) * self.weight.shape[0], (group_rank(self.group) + 1) * self.weight.shape[0])
        self.load_shard(weight[rows], None if bias is None else bias[rows])

    @torch.no_grad()
    def load_shard(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy this rank's pre-cut weight (and bias); ValueError when a shape differs."""
        self._load_weight(weight)
        if self.bias is not None:
            _copy(self.bias, bias, "bias")


class RowParallelLinear(ParallelLinear):
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
        self.in_features, self.out_features = in_features, out_features
        local = _split(in_features, group_size(group), "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, local, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        if initialise_weights():
            nn.init.normal_(self.weight, std=in_features**-0.5)
        self._start()

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x `[B, S, in / tp]` (or `[B, S, in]`), adapter_ids `[B]` (-1: no adapter) -> `[B, S, out]`."""
        if not self.input_is_parallel:
            local = self.weight.shape[1]
            x = x[..., group_rank(self.group) * local : (group_rank(self.group) + 1) * local]
        y = self.product(x, None)
        if adapter_ids is not None and self.lora_a is not None and self.lora_b is not None:
            y = y + lora_delta(x, self.lora_a, self.lora_b, adapter_ids)  # partial, like x_r W_r^T
        y = all_reduce_sum(y, self.group)
        return y if self.bias is None else y + self.bias


    @torch.no_grad()
    def load_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Keep this rank's contiguous block of input columns of a full `[out, in]` weight."""
        local = self.weight.shape[1]
        cols = slice(group_rank(self.group) * local, (group_rank(self.group) + 1) * local)
        self.load_shard(weight[:, cols], bias)

    @torch.no_grad()
    def load_shard(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy this rank's pre-cut weight (and bias); ValueError when a shape differs."""
        self._load_weight(weight)
        if self.bias is not None:
            _copy(self.bias, bias, "bias")


def int4_reason(layer: ParallelLinear) -> str | None:
    """None when `quantize_weights('int4')` holds this parallel linear in int4, else why it stays in float.

    Decided on the whole layer's outputs, so every tensor-parallel degree quantizes the same layers:
    a multiple of 16 (the int4 kernel's tile; a shard with fewer rows uses the dequantized product).
    Inputs that do not split into whole groups are an error (`int4_group_error`), not a reason."""
    total_out = layer.out_features
    if total_out % 16:
        return f"the int4 layout needs a multiple of 16 outputs, this layer has {total_out}"
    return None


def int4_group_error(layer: ParallelLinear, name: str, group_size: int = 32) -> str | None:
    """Why this layer's inputs (this rank's share under tensor parallelism) cannot be int4 groups, or None."""
    width = layer.weight.shape[1]
    total = layer.in_features
    if total % group_size:
        return f"{name} has {total} inputs, not a multiple of the int4 group size {group_size}"
    if width % group_size:
        return (f"{name}'s {total} inputs split into {width} per tensor-parallel rank, not whole int4 groups of {group_size} "
                "(a group would span two ranks)")
    return None


def _copy(param: torch.Tensor, value: torch.Tensor | None, name: str) -> None:
    if value is None or value.shape != param.shape:
        got = None if value is None else list(value.shape)
        raise ValueError(f"{name}: got {got}, this rank's shard is {list(param.shape)}")
    param.copy_(value)
