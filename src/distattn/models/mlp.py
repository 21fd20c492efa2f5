"""The dense blocks of the decoder: HF's RMSNorm and the tensor-parallel gated MLP (SwiGLU / GeGLU)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..layers.linear import ColumnParallelLinear, RowParallelLinear
from ..parallel.comm import group_rank


class RMSNorm(nn.Module):
    """HF's RMSNorm: normalise in fp32 (fp64 for fp64), then scale by `offset + weight`.

    Llama scales in the input dtype (`weight * x.to(dtype)`); gpt-oss and Gemma scale in fp32
    and cast after (`scale_in_float`); Gemma's weight is an offset from 1 (`offset=1`).
    """

    def __init__(self, size: int, eps: float, dtype: torch.dtype, *, offset: float = 0.0, scale_in_float: bool = False) -> None:
        super().__init__()
        self.eps, self.offset, self.scale_in_float = eps, offset, scale_in_float
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., size]` -> same shape and dtype."""
        acc = x.to(torch.promote_types(x.dtype, torch.float32))
        acc = acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_in_float:
            return (acc * (self.offset + self.weight.to(acc.dtype))).to(x.dtype)
        return (self.offset + self.weight) * acc.to(x.dtype)


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu: Llama, Qwen, Mistral) or GeGLU (tanh-GELU: Gemma),
    tensor-parallel over `group`.

    gate and up are one column-parallel matmul (`gate_up_proj`: this rank's gate rows, then
    its up rows), one pass over their weights.
    """

    def __init__(self, hidden: int, intermediate: int, group: Any, dtype: torch.dtype, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"hidden activation {activation!r} is not supported; distattn.models has {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.gate_up_proj = ColumnParallelLinear(hidden, 2 * intermediate, bias=False, group=group, dtype=dtype)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=False, group=group, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, S, hidden]` -> `[B, S, hidden]` (all-reduced)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, S, intermediate / tp] each
        return self.down_proj(self.act(gate) * up)

    def load(self, source: Any, prefix: str, names: str = "mlp.") -> None:
        """This rank's gate/up rows and down columns of an HF checkpoint's `{prefix}{names}{gate,up,down}_proj` tensors."""
        rank = group_rank(self.down_proj.group)
        rows = self.down_proj.weight.shape[1]  # this rank's share of the intermediate size
        start, stop = rank * rows, (rank + 1) * rows
        gate = source.read(prefix + names + "gate_proj.weight", 0, start, stop)
        up = source.read(prefix + names + "up_proj.weight", 0, start, stop)
        self.gate_up_proj.load_shard(torch.cat([gate, up]))
        self.down_proj.load_shard(source.read(prefix + names + "down_proj.weight", 1, start, stop))
