"""Quantized KV caches: codes equal a plain-torch reference bit for bit, every cache kind reads back
exactly that reference, the memory shrinks as stated, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from distattn import AttentionConfig, KVCacheManager
from distattn.ops.kv_quant import dequantize_kv, quantize_kv
from distattn.paged import PagedKVCacheManager

KV, DIM = 2, 16
CONFIG = AttentionConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=KV, head_dim=DIM)


def reference_round_trip(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The scheme in plain torch, written from its definition: what a cache must give back for x `[..., D]` (fp32)."""
    if kind == "fp8":  # direct cast, finite values saturating at the format's largest, 448
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32)
    scale = x.abs().max(dim=-1, keepdim=True).values / 127  # symmetric, one scale per vector
    codes = torch.where(scale > 0, torch.round(x / torch.where(scale > 0, scale, 1)), 0).clamp(-127, 127)
    return codes * scale


def awkward_vectors(n: int, seed: int) -> torch.Tensor:
    """`[n, KV, DIM]` vectors over many magnitudes: tiny (fp8 subnormals), huge (saturation), zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, KV, DIM, generator=gen) * torch.logspace(-6, 4, n).view(n, 1, 1)
    x[n // 2] = 0  # a zero vector: codes 0, scale 0
    return x


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_round_trip_equals_the_plain_torch_reference_bit_for_bit(kind: str) -> None:
    x = awkward_vectors(40, 0)
    codes, scale = quantize_kv(x, kind)
    assert codes.dtype == (torch.float8_e4m3fn if kind == "fp8" else torch.int8)
    assert torch.equal(dequantize_kv(codes, scale, torch.float32), reference_round_trip(x, kind))
    if kind == "int8":
        assert scale.shape == (40, KV) and int(codes.abs().max()) == 127  # every non-zero vector uses the whole range
    y = torch.tensor([[[float("nan")] + [1.0] * (DIM - 1), [float("inf")] + [1.0] * (DIM - 1)]])
    got = dequantize_kv(*quantize_kv(y, kind), torch.float32)
    assert torch.isnan(got[0, :, 0]).all()  # a non-finite value stays non-finite (never a plausible 448)
    if kind == "fp8":
        assert torch.equal(got[0, :, 1:], y[0, :, 1:])  # the rest of the vector is kept
    else:
        assert torch.isnan(got).all()  # its vector's scale carries it: the whole vector is NaN


def _write_steps(mgr, batch: int, steps: list[int]) -> list[torch.Tensor]:
    """Write fresh K (and V = -K) of each row for each step's number of tokens; returns each step's K `[B, KV, S, DIM]`."""
    written, start = [], 0
    paged = isinstance(mgr, PagedKVCacheManager)
    for i, width in enumerate(steps):
        pos = torch.arange(start, start + width).expand(batch, -1)
        valid = torch.ones_like(pos, dtype=torch.bool)
        if paged:
            mgr.reserve(None, pos)
        k = awkward_vectors(batch * width, i).view(batch, width, KV, DIM).transpose(1, 2)
        mgr.layer(0).write(None, k, -k, pos, valid)
        written.append(k)
        start += width
    return written


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("cache", ["static", "rolling", "paged"])
def test_every_cache_reads_back_the_reference(kind: str, cache: str) -> None:
    """Prefill then decode steps; the read gives the reference round trip of each kept token (both K and V)."""
    steps, batch = [7, 1, 1, 3], 2
    if cache == "paged":
        mgr = PagedKVCacheManager(CONFIG, num_layers=1, num_blocks=16, block_size=4, max_batch_size=batch, max_seq_len=32, kv_cache_dtype=kind)
        for row in range(batch):
            mgr.add_sequence(row)
    else:
        window = 5 if cache == "rolling" else None
        config = AttentionConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=KV, head_dim=DIM, sliding_window=window)
        mgr = KVCacheManager(config, num_layers=1, max_batch_size=batch, max_seq_len=32, speculation_width=3, kv_cache_dtype=kind)
    k = torch.cat(_write_steps(mgr, batch, steps), dim=2)  # [B, KV, 12, DIM]
    got_k, got_v, got_pos = mgr.layer(0).read(None, batch)
    held = got_pos[0] >= 0
    kept = got_pos[0][held]
    assert torch.equal(got_k[:, :, held], reference_round_trip(k[:, :, kept], kind))
    assert torch.equal(got_v[:, :, held], reference_round_trip(-k[:, :, kept], kind))
    assert torch.equal(got_k[:, :, ~held], torch.zeros_like(got_k[:, :, ~held]))  # empty slots read as exact zeros
    if cache == "rolling":  # window 5 + speculation 3 - 1 slots: the newest 7 positions
        assert sorted(kept.tolist()) == list(range(5, 12))
    else:
        assert kept.tolist() == list(range(12))


def test_copy_on_write_keeps_codes_and_scales_and_empties_dropped_slots() -> None:
    mgr = PagedKVCacheManager(CONFIG, num_layers=1, num_blocks=8, block_size=4, max_batch_size=2, max_seq_len=32, kv_cache_dtype="int8")
    mgr.add_sequence(0)
    k = _write_steps(mgr, 1, [6])[0]
    mgr.fork(0, 1)
    pos = torch.tensor([[5]])  # sequence 1 rewrites position 5 in a block it shares: it gets a copy
    mgr.reserve(torch.tensor([1]), pos)
    new = awkward_vectors(1, 9).view(1, KV, 1, DIM)
    mgr.layer(0).write(torch.tensor([1]), new, new, pos, torch.ones(1, 1, dtype=torch.bool))
    k0, _, pos0 = mgr.layer(0).read(torch.tensor([0]), 1)
    k1, _, pos1 = mgr.layer(0).read(torch.tensor([1]), 1)
    assert torch.equal(k0[:, :, :6], reference_round_trip(k, "int8"))  # the owner's tokens untouched
    assert torch.equal(k1[:, :, :5], k0[:, :, :5]) and torch.equal(k1[:, :, 5:6], reference_round_trip(new, "int8"))
    assert pos1[0, :6].tolist() == list(range(6)) and pos0[0, :6].tolist() == list(range(6))


@pytest.mark.parametrize("kind,ratio", [("fp8", 0.25), ("int8", (DIM + 4) / (4 * DIM))])  # 1 byte per element (+ a 4-byte scale per vector)
def test_cache_memory_shrinks_as_stated(kind: str, ratio: float) -> None:
    kwargs = dict(num_layers=3, max_batch_size=2, max_seq_len=64)
    full = KVCacheManager(CONFIG, **kwargs).memory_bytes()
    assert KVCacheManager(CONFIG, **kwargs, kv_cache_dtype=kind).memory_bytes() == ratio * full
    paged = PagedKVCacheManager(CONFIG, num_blocks=8, block_size=4, max_batch_size=2, max_seq_len=32, num_layers=2, kv_cache_dtype=kind)
    plain = PagedKVCacheManager(CONFIG, num_blocks=8, block_size=4, max_batch_size=2, max_seq_len=32, num_layers=2)
    paged.add_sequence(0), plain.add_sequence(0)
    for mgr in (paged, plain):
        mgr.reserve(torch.tensor([0]), torch.arange(9).view(1, -1))
    assert paged.bytes_in_use() == ratio * plain.bytes_in_use() > 0


def test_bad_kv_cache_dtypes_are_refused(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp4' is unknown: pass None \(the model's dtype\) or one of \['fp8', 'int8'\]"):
        KVCacheManager(CONFIG, num_layers=1, max_batch_size=1, max_seq_len=8, kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="kv_cache_dtype='int4' is unknown"):
        PagedKVCacheManager(CONFIG, num_layers=1, num_blocks=2, max_batch_size=1, max_seq_len=8, kv_cache_dtype="int4")
    monkeypatch.delattr(torch, "float8_e4m3fn")  # a torch without float8
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' needs torch.float8_e4m3fn.*use kv_cache_dtype='int8'"):
        KVCacheManager(CONFIG, num_layers=1, max_batch_size=1, max_seq_len=8, kv_cache_dtype="fp8")


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_serving_over_quantized_pages_gives_generates_tokens(kind: str, tmp_path) -> None:
    """The paged cache (continuous batching, window layers) stores and reads the same codes as the static cache:
    serve's tokens equal generate's over the same quantized cache kind. A prefix hit reads the shared prefix as
    stored (quantized) where generate's prefill sees it at full precision: that row may part from generate later."""
    from distattn.models import DecoderLM, generate, serve

    from test_models import PROMPTS, family_checkpoint

    family_checkpoint("gpt_oss", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, kv_cache_dtype=kind)
    prompts = PROMPTS + [PROMPTS[0][:9] + [4, 4]]  # shares two blocks of 4 with the first prompt
    want = generate(model, prompts, max_new_tokens=16).tokens
    caches = []
    options = dict(max_new_tokens=16, max_running=2, block_size=4, on_step=caches.append)
    assert serve(model, prompts, prefix_caching=False, **options).tokens == want
    assert caches and caches[-1].layer(0).k.dtype == (torch.float8_e4m3fn if kind == "fp8" else torch.int8)
    hit = serve(model, prompts, **options).tokens
    assert caches[-1].hit_tokens == 8  # the last request found the first's two blocks
    assert hit[:3] == want[:3] and hit[3][0] == want[3][0]
