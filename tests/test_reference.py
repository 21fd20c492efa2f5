"""The fp64 specification against independent formulations, and kernels against it."""

from __future__ import annotations

import math

import pytest
import torch

from distattn.kernels import AttentionSpec, available_backends, get_backend
from distattn.ops.merge import apply_sinks, merge_partials
from distattn.ops.reference import attention_reference

from tolerances import FP32, FP64

# backends that return the log-sum-exp run every stage (flex serves prefill only: tests/test_flex.py)
LSE_BACKENDS = [n for n in available_backends() if not getattr(get_backend(n), "fuses_sinks", False)]


def naive_attention(q, k, v, q_pos, k_pos, scale, window, chunk, sinks, mask):
    """One query at a time in Python floats; the mask rules written out by hand."""
    batch, n_q, s_q, dim = q.shape
    n_kv, s_k = k.shape[1], k.shape[2]
    out = torch.zeros(batch, n_q, s_q, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(n_q):
            g = h // (n_q // n_kv)
            for i in range(s_q):
                p = int(q_pos[b, i])
                logits = []
                for j in range(s_k):
                    kp = int(k_pos[b, j])
                    if kp < 0 or kp > p:
                        continue
                    if window is not None and not p - window < kp:
                        continue
                    if chunk is not None and kp // chunk != p // chunk:
                        continue
                    if mask is not None and not bool(mask[b, 0, i, j]):
                        continue
                    logits.append((j, float(q[b, h, i] @ k[b, g, j]) * scale))
                terms = [x for _, x in logits] + ([float(sinks[h])] if sinks is not None else [])
                if not terms:
                    continue
                top = max(terms)
                denom = sum(math.exp(x - top) for x in terms)
                for j, x in logits:
                    out[b, h, i] += math.exp(x - top) / denom * v[b, g, j]
    return out


def gpt_oss_sdpa(Q, K, V, S, sm_scale, sliding_window=0):
    """OpenAI gpt-oss's attention formula (torch reference): Q [T, Hkv, G, D], K, V [T, Hkv, D], S [Hq].

    The sink is one more softmax column, dropped afterwards; the window masks keys
    at or beyond `sliding_window` tokens back.
    """
    n_tokens, n_heads, q_mult, _ = Q.shape
    K = K[:, :, None, :].expand(-1, -1, q_mult, -1)
    V = V[:, :, None, :].expand(-1, -1, q_mult, -1)
    S = S.reshape(n_heads, q_mult, 1, 1).expand(-1, -1, n_tokens, -1)
    mask = torch.triu(Q.new_full((n_tokens, n_tokens), -float("inf")), diagonal=1)
    if sliding_window > 0:
        mask += torch.tril(mask.new_full((n_tokens, n_tokens), -float("inf")), diagonal=-sliding_window)
    QK = torch.einsum("qhmd,khmd->hmqk", Q, K) * sm_scale + mask[None, None]
    W = torch.softmax(torch.cat([QK, S], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("hmqk,khmd->qhmd", W, V).reshape(n_tokens, -1)


def _random_case(seed: int, *, s_q: int = 5, s_k: int = 11, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    batch, n_kv, groups, dim = 2, 2, 3, 8
    q = torch.randn(batch, n_kv * groups, s_q, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, n_kv, s_k, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, n_kv, s_k, dim, generator=gen, dtype=dtype)
    k_pos = torch.stack([torch.randperm(s_k + 3, generator=gen)[:s_k] for _ in range(batch)])  # unordered, gappy
    k_pos[0, 2] = -1  # an empty slot
    q_pos = torch.stack([torch.randperm(s_k + 3, generator=gen)[:s_q] for _ in range(batch)])
    sinks = torch.randn(n_kv * groups, generator=gen, dtype=dtype)
    mask = torch.rand(batch, 1, s_q, s_k, generator=gen) > 0.2
    return q, k, v, q_pos, k_pos, sinks, mask


@pytest.mark.parametrize("window,chunk", [(None, None), (4, None), (None, 4), (1, None)])
@pytest.mark.parametrize("use_sinks", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_reference_matches_naive_loop(window, chunk, use_sinks, use_mask) -> None:
    q, k, v, q_pos, k_pos, sinks, mask = _random_case(seed=3)
    sinks = sinks if use_sinks else None
    mask = mask if use_mask else None
    out, _ = attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.37, sliding_window=window, chunk_size=chunk, mask=mask, sinks=sinks)
    expected = naive_attention(q, k, v, q_pos, k_pos, 0.37, window, chunk, sinks, mask)
    assert (out - expected).abs().max().item() <= FP64


@pytest.mark.parametrize("window", [0, 1, 3, 6])
def test_reference_matches_gpt_oss_formula(window: int) -> None:
    gen = torch.Generator().manual_seed(7)
    tokens, n_kv, groups, dim = 12, 2, 4, 16
    Q = torch.randn(tokens, n_kv, groups, dim, generator=gen, dtype=torch.float64)
    K = torch.randn(tokens, n_kv, dim, generator=gen, dtype=torch.float64)
    V = torch.randn(tokens, n_kv, dim, generator=gen, dtype=torch.float64)
    S = torch.randn(n_kv * groups, generator=gen, dtype=torch.float64) * 2
    scale = dim**-0.5
    expected = gpt_oss_sdpa(Q, K, V, S, scale, window)  # [T, Hq * D]
    q = Q.reshape(tokens, n_kv * groups, dim).transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
    k = K.transpose(0, 1).unsqueeze(0)
    v = V.transpose(0, 1).unsqueeze(0)
    pos = torch.arange(tokens).unsqueeze(0)
    out, _ = attention_reference(q, k, v, q_pos=pos, k_pos=pos, scale=scale, sliding_window=window or None, sinks=S)
    got = out[0].transpose(0, 1).reshape(tokens, -1)
    assert (got - expected).abs().max().item() <= FP64


@pytest.mark.parametrize("s_q", [1, 4, 40])  # folded GQA rows, and expanded k/v
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64), (torch.float32, FP32)])
@pytest.mark.parametrize("window,chunk", [(None, None), (4, None), (None, 4)])
def test_sdpa_matches_reference(s_q, dtype, tol, window, chunk) -> None:
    q, k, v, q_pos, k_pos, _, mask = _random_case(seed=11, s_q=s_q, s_k=47, dtype=dtype)
    q_pos = torch.stack([torch.randperm(50)[:s_q] for _ in range(2)])
    spec = AttentionSpec(scale=0.3, sliding_window=window, chunk_size=chunk)
    ref_out, ref_lse = get_backend("reference").attend(q, k, v, q_pos=q_pos, k_pos=k_pos, spec=spec, mask=mask)
    out, lse = get_backend("sdpa").attend(q, k, v, q_pos=q_pos, k_pos=k_pos, spec=spec, mask=mask)
    assert out.dtype == dtype
    assert (out - ref_out).abs().max().item() <= tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))  # the same queries see no key
    assert (lse[finite] - ref_lse[finite]).abs().max().item() <= tol * 10  # lse is of order 10: same relative bound


@pytest.mark.parametrize("kernel", LSE_BACKENDS)
def test_merge_then_sinks_equals_one_softmax(kernel: str) -> None:
    q, k, v, q_pos, k_pos, sinks, _ = _random_case(seed=5, s_q=6, s_k=20)
    q_pos = torch.full((2, 6), 30) + torch.arange(6)
    k_pos = torch.arange(20).expand(2, 20).clone()
    spec = AttentionSpec(scale=0.4, sliding_window=9)
    backend = get_backend(kernel)
    parts = [backend.attend(q, k[:, :, sl], v[:, :, sl], q_pos=q_pos, k_pos=k_pos[:, sl], spec=spec) for sl in (slice(0, 13), slice(13, 20))]
    out, lse = merge_partials(parts)
    got = apply_sinks(out, lse, sinks)
    expected, _ = attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.4, sliding_window=9, sinks=sinks)
    assert (got - expected).abs().max().item() <= FP64
    # the window (30 - 9 < k) leaves the first part empty for the early queries: lse -inf there
    assert torch.isinf(parts[0][1]).any()


@pytest.mark.parametrize("kernel", LSE_BACKENDS)
@pytest.mark.parametrize("sink_value", [None, -1e4, 1e4])
def test_query_without_keys_gives_zeros_not_nan(kernel: str, sink_value) -> None:
    q, k, v, _, _, _, _ = _random_case(seed=2, s_q=3, s_k=5, dtype=torch.float32)
    q = q * 1e3  # large logits too
    q_pos = torch.tensor([[0, 1, 2], [3, 4, 5]])
    k_pos = torch.tensor([[5, 6, 7, 8, 9], [-1, -1, -1, -1, -1]])  # row 0: all keys in the future; row 1: none valid
    spec = AttentionSpec(scale=1.0)
    out, lse = get_backend(kernel).attend(q, k, v, q_pos=q_pos, k_pos=k_pos, spec=spec)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    if sink_value is not None:
        sinks = torch.full((q.shape[1],), sink_value)
        assert torch.equal(apply_sinks(out, lse, sinks), torch.zeros_like(out))


def test_large_logits_and_sinks_stay_finite() -> None:
    q, k, v, _, _, _, _ = _random_case(seed=4, s_q=4, s_k=9, dtype=torch.float32)
    q = q * 1e3
    pos = torch.arange(9).expand(2, 9)
    for sink_value in (-1e4, 1e4):
        sinks = torch.full((q.shape[1],), sink_value)
        out, lse = get_backend("sdpa").attend(q, k, v, q_pos=pos[:, 5:], k_pos=pos, spec=AttentionSpec(scale=1.0))
        got = apply_sinks(out, lse, sinks)
        assert torch.isfinite(got).all()
        expected, _ = attention_reference(q.double(), k.double(), v.double(), q_pos=pos[:, 5:], k_pos=pos, scale=1.0, sinks=sinks.double())
        assert (got.double() - expected).abs().max().item() <= 1e-3  # fp32 logits of order 1e4: ~1e-3 absolute rounding


@pytest.mark.parametrize("kernel", LSE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_softmax_in_fp32(kernel: str, dtype) -> None:
    q, k, v, q_pos, k_pos, sinks, _ = _random_case(seed=8, s_q=4, s_k=30)
    q = q * 8  # logits of order 50: a half-precision softmax would lose them
    q_pos = torch.full((2, 4), 40) + torch.arange(4)
    spec = AttentionSpec(scale=0.5, sliding_window=20)
    out, lse = get_backend(kernel).attend(q.to(dtype), k.to(dtype), v.to(dtype), q_pos=q_pos, k_pos=k_pos, spec=spec)
    assert out.dtype == dtype and lse.dtype == torch.float32
    got = apply_sinks(out, lse, sinks.to(dtype))
    expected, expected_lse = attention_reference(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), q_pos=q_pos, k_pos=k_pos, scale=0.5, sliding_window=20, sinks=sinks.to(dtype).double())
    # inputs rounded to half precision are the truth here; what remains is the output's
    # own rounding (bf16: 8 bits, fp16: 11 bits of mantissa) on values of order 1
    tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    assert (got.double() - expected).abs().max().item() <= tol
    finite = torch.isfinite(expected_lse)
    assert (lse.double()[finite] - expected_lse[finite]).abs().max().item() <= 1e-3  # fp32 lse of order 50


def test_blocked_reads_only_the_keys_a_block_can_reach() -> None:
    """Window W: each block of 256 queries reads at most 256 + W - 1 keys, so work is O(S * W)."""
    from distattn.kernels import select_backend
    from distattn.kernels.blocked import QUERY_BLOCK, key_selection

    pos = torch.arange(4096).unsqueeze(0)
    for spec, reach in ((AttentionSpec(scale=1.0, sliding_window=128), 127), (AttentionSpec(scale=1.0, chunk_size=100), 99)):
        for start in range(0, 4096, QUERY_BLOCK):
            keys = key_selection(pos[:, start : start + QUERY_BLOCK], pos, spec)
            assert isinstance(keys, slice) and keys.stop - keys.start <= QUERY_BLOCK + reach
    q, k = torch.empty(1, 8, 2048, 64), torch.empty(1, 2, 2048, 64)
    assert select_backend("auto", q, k, AttentionSpec(scale=1.0, sliding_window=128)).name == "blocked"
    assert select_backend("auto", q, k, AttentionSpec(scale=1.0)).name == "sdpa"  # nothing to skip
    assert select_backend("auto", q[:, :, :1], k[:, :, :200], AttentionSpec(scale=1.0, sliding_window=128)).name == "sdpa"
