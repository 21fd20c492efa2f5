"""An fp64 attention layer written out from HF-named weights: the oracle for property tests.

It shares only the specification (`attention_reference`) and RoPE math with the
package (both tested against HF and OpenAI's formula); projections, norms, stages,
caches and kernels are not used.
"""

from __future__ import annotations

import torch

from distattn import AttentionConfig
from distattn.ops.reference import attention_reference
from distattn.ops.rope import apply_rope, inv_freq_for, rope_cos_sin


def _norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def reference_layer(cfg: AttentionConfig, w: dict[str, torch.Tensor], x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Whole-sequence outputs `[B, T, hidden]` for x `[B, T, hidden]` at positions `[B, T]` (fp64)."""
    batch, seq, _ = x.shape

    def linear(name: str, t: torch.Tensor) -> torch.Tensor:
        out = t @ w[f"{name}.weight"].T
        return out + w[f"{name}.bias"] if f"{name}.bias" in w else out

    q, k, v = linear("q_proj", x), linear("k_proj", x), linear("v_proj", x)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.view(batch, seq, cfg.n_heads, cfg.head_dim)
    k = k.view(batch, seq, cfg.n_kv_heads, cfg.head_dim)
    v = v.view(batch, seq, cfg.n_kv_heads, cfg.head_dim)
    norm = cfg.qk_norm is not None
    if norm and not cfg.qk_norm_after_rope:
        q, k = _norm(q, w.get("q_norm.weight"), cfg.rms_norm_eps), _norm(k, w.get("k_norm.weight"), cfg.rms_norm_eps)
    if cfg.rope is not None:
        inv_freq, factor = inv_freq_for(cfg.rope, cfg.rotary_dim)
        cos, sin = rope_cos_sin(inv_freq, positions, factor, torch.float64)
        q = apply_rope(q, cos, sin, rotary_dim=cfg.rotary_dim, interleaved=cfg.rope.interleaved)
        k = apply_rope(k, cos, sin, rotary_dim=cfg.rotary_dim, interleaved=cfg.rope.interleaved)
    if norm and cfg.qk_norm_after_rope:
        q, k = _norm(q, w.get("q_norm.weight"), cfg.rms_norm_eps), _norm(k, w.get("k_norm.weight"), cfg.rms_norm_eps)
    if cfg.attn_temperature_tuning:
        q = q * (torch.log1p(torch.floor((positions.double() + 1) / cfg.floor_scale)) * cfg.attn_scale + 1)[:, :, None, None]
    out, _ = attention_reference(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q_pos=positions, k_pos=positions,
        scale=cfg.scale, sliding_window=cfg.sliding_window, chunk_size=cfg.attention_chunk_size, sinks=w.get("sinks"),
    )
    return linear("o_proj", out.transpose(1, 2).reshape(batch, seq, -1))
