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
from .base import AttentionSpec, Backend

# Query blocks up to this many rows fold GQA groups into rows (decode, speculation);
# longer blocks expand k/v instead, since a folded bias would be G times larger.
_FOLD_MAX_QUERIES = 16
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _plain_causal(q_pos: torch.Tensor, k_pos: torch.Tensor, spec: AttentionSpec, allowed: torch.Tensor) -> bool:
    """True when the mask is exactly "key index <= query index": the same increasing
    positions for queries and keys, no window or chunk, nothing else masked."""
    if spec.sliding_window is not None or spec.chunk_size is not None or q_pos.shape != k_pos.shape:
        return False
    if not torch.equal(q_pos, k_pos) or not bool((q_pos[:, 1:] > q_pos[:, :-1]).all()):
        return False
    return bool(allowed.sum() == allowed.shape[0] * allowed.shape[2] * (allowed.shape[2] + 1) // 2)


def _bias(allowed: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Additive mask `[B, 1, Sq, Sk]` in q's dtype: 0 where allowed, -inf elsewhere.

    On CUDA the efficient kernel wants the bias's last dim 16-aligned in memory, so the
    storage is padded and a view returned.
    """
    batch, _, s_q, s_k = allowed.shape
    width = (s_k + 15) // 16 * 16 if q.device.type == "cuda" else s_k
    bias = torch.zeros(batch, 1, s_q, width, dtype=q.dtype, device=q.device)[..., :s_k]
    return bias.masked_fill_(~allowed, float("-inf"))


class SdpaBackend(Backend):
    name = "sdpa"
    takes_plain_causal = True  # attend(..., plain_causal=) skips looking at the positions when told

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
        sinks: torch.Tensor | None = None,
        plain_causal: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_q, s_q, head_dim = q.shape
        n_kv, s_k = k.shape[1], k.shape[2]
        groups = n_q // n_kv
        if s_k == 0:  # nothing to attend to (the fused kernels cannot take an empty key set)
            lse = torch.full((batch, n_q, s_q), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
            return torch.zeros_like(q), lse
        fold = groups > 1 and s_q <= _FOLD_MAX_QUERIES
        if plain_causal and not fold and spec.sliding_window is None and spec.chunk_size is None:
            # the caller knows every row is positions 0..S-1 with nothing masked: no mask to build,
            # and every query sees at least itself (no empty rows to zero)
            return self._per_kv_head(q, k, v, None, spec.scale)
        allowed = visible(q_pos, k_pos, sliding_window=spec.sliding_window, chunk_size=spec.chunk_size)
        allowed = allowed.unsqueeze(1)  # [B, 1, Sq, Sk]
        if mask is not None:
            allowed = allowed & mask
        empty = ~allowed.any(-1)  # [B, 1, Sq]: queries that see no key
        if fold:
            q_in = q.reshape(batch, n_kv, groups * s_q, head_dim)  # [B, Hkv, G*Sq, D], rows (g, s)
            allowed_in = allowed.expand(batch, groups, s_q, s_k).reshape(batch, 1, groups * s_q, s_k)
            out, lse = self._fused(q_in, k, v, _bias(allowed_in, q), spec.scale)
        else:
            if plain_causal is None:  # unknown: look (host syncs); a model call knows it once for all layers
                plain_causal = _plain_causal(q_pos, k_pos, spec, allowed)
            plain = plain_causal and spec.sliding_window is None and spec.chunk_size is None
            out, lse = self._per_kv_head(q, k, v, None if plain else _bias(allowed, q), spec.scale)
        out = out.reshape(batch, n_q, s_q, head_dim)  # [B, Hq, Sq, D]
        lse = lse.reshape(batch, n_q, s_q).to(torch.promote_types(q.dtype, torch.float32))
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        return out, lse

    def _per_kv_head(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each kv head serves its q heads through a stride-0 view (no copies): out `[B, Hq, Sq, D]`,
        lse `[B, Hq, Sq]` fp32 (fp64 for fp64 inputs)."""
        batch, n_q, s_q, head_dim = q.shape
        n_kv, s_k = k.shape[1], k.shape[2]
        groups = n_q // n_kv
        parts = []
        for h in range(n_kv):
            k_h = k[:, h : h + 1].expand(batch, groups, s_k, head_dim)
            v_h = v[:, h : h + 1].expand(batch, groups, s_k, head_dim)
            parts.append(self._fused(q[:, h * groups : (h + 1) * groups], k_h, v_h, bias, scale))
        out, lse = (torch.cat(t, dim=1) for t in zip(*parts)) if n_kv > 1 else parts[0]
        return out, lse.reshape(batch, n_q, s_q).to(torch.promote_types(q.dtype, torch.float32))

    @staticmethod
    def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused call: q `[B, H, Sq, D]`, k and v `[B, H, Sk, D]`, additive bias `[B, 1, Sq, Sk]`
        (None: plain causal, and the kernel skips future key blocks itself)."""
        if q.device.type == "cuda":
            if bias is None:
                out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True, scale=scale)
            else:
                expanded = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
                out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, expanded, True, 0.0, False, scale=scale)
            return out, lse[..., : q.shape[2]]
        if bias is None:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
