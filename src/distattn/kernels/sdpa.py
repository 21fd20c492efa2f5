"""The SDPA backend: PyTorch's fused attention ops that also return the log-sum-exp.

CPU: `aten._scaled_dot_product_flash_attention_for_cpu` (flash, blocked, never an
S x S probability matrix). CUDA: `aten._scaled_dot_product_efficient_attention`
with `compute_log_sumexp=True`. Both take the position-derived mask as an additive
bias. GQA without copying k/v for short query blocks: the q heads of one kv head
become extra query rows (folding); longer blocks expand k/v across the group.
"""

from __future__ import annotations

import torch

from ..ops.masks import visible
from .base import AttentionSpec

# Query blocks up to this many rows fold GQA groups into rows (decode, speculation);
# longer blocks expand k/v instead, since a folded bias would be G times larger.
_FOLD_MAX_QUERIES = 16
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class SdpaBackend:
    name = "sdpa"

    def supports(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> str | None:
        if q.device.type == "cpu":
            if q.dtype not in _CPU_DTYPES:
                return f"dtype {q.dtype} is not supported by the CPU flash kernel"
            return None
        if q.device.type == "cuda":
            if q.dtype not in _CUDA_DTYPES:
                return f"dtype {q.dtype} is not supported by the CUDA efficient-attention kernel"
            return None
        return f"device type {q.device.type!r} has no fused SDPA kernel that returns the log-sum-exp"

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        spec: AttentionSpec,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_q, s_q, head_dim = q.shape
        n_kv, s_k = k.shape[1], k.shape[2]
        groups = n_q // n_kv
        allowed = visible(q_pos, k_pos, sliding_window=spec.sliding_window, chunk_size=spec.chunk_size)
        allowed = allowed.unsqueeze(1)  # [B, 1, Sq, Sk]
        if mask is not None:
            allowed = allowed & mask
        empty = ~allowed.any(-1)  # [B, 1, Sq]: queries that see no key
        fold = groups > 1 and s_q <= _FOLD_MAX_QUERIES
        if fold:
            q_in = q.reshape(batch, n_kv, groups * s_q, head_dim)  # [B, Hkv, G*Sq, D], rows (g, s)
            allowed_in = allowed.expand(batch, groups, s_q, s_k).reshape(batch, 1, groups * s_q, s_k)
            k_in, v_in = k, v
        else:
            q_in, allowed_in = q, allowed
            k_in = k.unsqueeze(2).expand(batch, n_kv, groups, s_k, head_dim).reshape(batch, n_q, s_k, head_dim)
            v_in = v.unsqueeze(2).expand(batch, n_kv, groups, s_k, head_dim).reshape(batch, n_q, s_k, head_dim)
        if q.device.type == "cuda":
            out, lse = self._cuda(q_in, k_in, v_in, allowed_in, spec.scale)
        else:
            bias = torch.zeros(allowed_in.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~allowed_in, float("-inf"))
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q_in, k_in, v_in, 0.0, False, attn_mask=bias, scale=spec.scale
            )
        out = out.reshape(batch, n_q, s_q, head_dim)  # [B, Hq, Sq, D]
        lse = lse.reshape(batch, n_q, s_q).to(torch.promote_types(q.dtype, torch.float32))
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        return out, lse

    @staticmethod
    def _cuda(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_heads, s_q, _ = q.shape
        s_k = k.shape[2]
        # the kernel wants the bias's last dim 16-aligned in memory: allocate padded, pass a view
        storage = torch.zeros(batch, 1, s_q, _round_up(s_k, 16), dtype=q.dtype, device=q.device)
        bias = storage[..., :s_k]
        bias.masked_fill_(~allowed, float("-inf"))
        bias = bias.expand(batch, n_heads, s_q, s_k)
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=scale
        )
        return out, lse[..., :s_q]
