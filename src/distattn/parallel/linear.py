"""Column- and row-parallel linear layers (NxDI / Megatron semantics).

Both take global sizes and hold this rank's shard. `load_full(weight, bias)` cuts the
shard out of a full checkpoint tensor (contiguous split); layers whose shards follow
a HeadLayout load pre-cut tensors with `load_shard`.

Multi-LoRA: `set_lora(lora_a, lora_b)` gives a layer stacked adapter halves and
`forward(x, adapter_ids)` adds each row's adapter (`distattn.lora.lora_delta`). A
column-parallel layer holds A whole and B's rows of its output shard; a row-parallel
layer holds A's columns of its input shard and B whole, and adds its partial delta
before the all-reduce, so the sum over ranks is the full x A^T B^T.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..lora import lora_delta
from .comm import Group, all_gather_last_dim, all_reduce_sum, group_rank, group_size

FUSED_GATHER_ERROR = "Gathering states followed by fused qkv is not allowed as it has a different weight sharding scheme"


def _split(total: int, parts: int, name: str) -> int:
    if total % parts:
        raise ValueError(f"{name}={total} does not divide by the tensor-parallel size {parts}")
    return total // parts


class ColumnParallelLinear(nn.Module):
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
        y = F.linear(x, self.weight, self.bias)
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
        _copy(self.weight, weight, "weight")
        if self.bias is not None:
            _copy(self.bias, bias, "bias")


class RowParallelLinear(nn.Module):
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
        y = F.linear(x, self.weight)
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
        _copy(self.weight, weight, "weight")
        if self.bias is not None:
            _copy(self.bias, bias, "bias")


def _no_lora(layer: nn.Module) -> None:
    # not part of state_dict: adapters are loaded separately from the base weights
    layer.register_buffer("lora_a", None, persistent=False)
    layer.register_buffer("lora_b", None, persistent=False)


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
