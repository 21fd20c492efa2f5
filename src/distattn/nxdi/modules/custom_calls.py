"""NxDI's `CustomRMSNorm` and the `get_rmsnorm_cls` helper of its model files, on plain PyTorch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CustomRMSNorm(nn.Module):
    """RMSNorm over the last dim: `x * rsqrt(mean(x^2) + eps) * weight`, computed in fp32.

    Args:
        hidden_size: width of the weight; None for the weightless norm (NxDI's
            `CustomRMSNorm()` as used for `use_qk_norm`).
        eps: added to the mean square.

    x `[..., hidden_size]` -> same shape and dtype.
    """

    def __init__(self, hidden_size: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if hidden_size is not None else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(hidden_states.dtype, torch.float32)
        x = hidden_states.to(acc)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.weight is not None:
            x = x * self.weight.to(acc)
        return x.to(hidden_states.dtype)


def get_rmsnorm_cls(hidden_size: int | None = None, unpadded_hidden_size: int | None = None, eps: float = 1e-5) -> Any:
    """The RMSNorm NxDI model files use, with NxDI's signature: `get_rmsnorm_cls()` (older model files) is the
    class, and `get_rmsnorm_cls(hidden_size, eps=...)` an instance.

    On Neuron, NxDI picks its kernel-backed norm and on CPU the HF one; here both
    are `CustomRMSNorm`, which runs on CPU and CUDA. `unpadded_hidden_size` (NxDI's padded
    hidden states) must be None or equal hidden_size here: weights are never padded.
    """
    if hidden_size is None:
        return CustomRMSNorm
    if unpadded_hidden_size is not None and unpadded_hidden_size != hidden_size:
        raise ValueError(f"unpadded_hidden_size={unpadded_hidden_size} with hidden_size={hidden_size}: hidden states are never "
                         "padded here; pass the model's hidden_size alone")
    return CustomRMSNorm(hidden_size, eps)


def __getattr__(name: str) -> object:
    from distattn.nxdi import missing_name

    raise missing_name(__name__, name)
