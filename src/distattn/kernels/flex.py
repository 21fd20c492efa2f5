"""The flex backend: compiled FlexAttention with a block mask built from positions.

Block masks skip every key block a window or chunk cannot reach. Compiled on the CPU,
FlexAttention cannot return the log-sum-exp, so sinks are applied inside the call:
one extra key with a zero value whose score is the head's sink logit gives exactly
softmax([scores, s_h]) @ [V, 0]. Without a log-sum-exp the result cannot be merged
with other partial results: this backend serves single-block calls (prefill).

Compilation (of the attention and of the block-mask builder) happens on first use for
each shape and is cached by torch.compile; later calls reuse it.
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from typing import Any

import torch

from .base import AttentionSpec, Backend

SINK_POSITION = -2  # marks the extra sink key in the key positions


@lru_cache(maxsize=1)
def _compiled() -> tuple[Any, Any] | str:
    """(compiled flex_attention, create_block_mask), or why they are unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:  # pragma: no cover - depends on the torch build
        return f"FlexAttention is not in this torch ({err})"
    if shutil.which("g++") is None and shutil.which("c++") is None and not torch.cuda.is_available():
        return "compiling FlexAttention on the CPU needs a C++ compiler (g++), and none is on PATH"
    return torch.compile(flex_attention, dynamic=False), create_block_mask


class FlexBackend(Backend):
    name = "flex"
    fuses_sinks = True  # attend(..., sinks=) applies them; it returns no log-sum-exp

    def supports(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> str | None:
        compiled = _compiled()
        if isinstance(compiled, str):
            return compiled
        if q.device.type not in ("cpu", "cuda"):
            return f"device type {q.device.type!r} is not supported by compiled FlexAttention"
        if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"dtype {q.dtype} is not supported by compiled FlexAttention"
        if q.device.type == "cpu" and torch.is_grad_enabled():
            return "compiled FlexAttention on the CPU is inference only: call under torch.no_grad() or torch.inference_mode()"
        return None

    def worthwhile(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> str | None:
        # Measured (gpt-oss shape, 64 q / 8 kv heads, window 128, fp32, 2-core CPU): 0.32 s vs
        # the blocked kernel's 0.27 s at 4096 tokens, 0.63 s vs 0.67 s at 8192, after a first
        # call that compiles for ~20 s. Not faster where measured, so "auto" leaves it to
        # explicit choice; CUDA has not been measured.
        return "measured no faster than the blocked kernel, and its first call compiles for ~20 s"

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
        plain_causal: bool | None = None,
        sinks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As every backend, plus `sinks` `[Hq]` applied inside; returns (out, None)."""
        compiled = _compiled()
        assert not isinstance(compiled, str)  # supports() refused the call otherwise
        flex, create_block_mask = compiled
        batch, n_q, s_q, _ = q.shape
        if sinks is not None:  # one zero-valued key per row whose score is the sink
            zeros = k.new_zeros(*k.shape[:2], 1, k.shape[3])
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            k_pos = torch.cat([k_pos, k_pos.new_full((batch, 1), SINK_POSITION)], dim=1)
        pair = None if mask is None or mask.shape[-1] == 1 else mask[:, 0]  # [B, Sq, Sk] query x key
        if mask is not None and pair is None:
            queries = mask[:, 0, :, 0]  # [B, Sq] padding queries see nothing
        else:
            queries = torch.ones(batch, s_q, dtype=torch.bool, device=q.device) if pair is None else pair.any(dim=-1)
        window, chunk = spec.sliding_window, spec.chunk_size

        def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            qp, kp = q_pos[b, qi], k_pos[b, ki]
            ok = (kp >= 0) & (kp <= qp)
            if window is not None:
                ok = ok & (kp > qp - window)
            if chunk is not None:
                ok = ok & (kp // chunk == qp // chunk)
            if pair is not None:
                ok = ok & pair[b, qi, ki.clamp(max=pair.shape[-1] - 1)]
            return (ok | (kp == SINK_POSITION)) & queries[b, qi]

        block_mask = create_block_mask(mask_mod, batch, None, s_q, k.shape[2], device=q.device, _compile=True)
        score_mod = None
        if sinks is not None:
            sink_logits = sinks.to(torch.float32)

            def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
                return torch.where(k_pos[b, ki] == SINK_POSITION, sink_logits[h].to(score.dtype), score)

        out = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=n_q != k.shape[1], scale=spec.scale)
        return out.masked_fill(~queries[:, None, :, None], 0.0), None
