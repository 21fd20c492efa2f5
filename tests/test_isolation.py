"""One request's non-finite values never reach another's tokens.

NaN / Inf planted in padding, in a restarted static row, in a rolling cache's stale slots
and in freed paged blocks: the next request gets exactly the outputs it gets alone on a
fresh cache, for every kernel. Masked and empty slots contribute exactly nothing, whatever
bytes they hold (the caches also keep every empty slot at zero).
"""

from __future__ import annotations

import pytest
import torch

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase
from distattn.kernels import AttentionSpec, available_backends, get_backend
from distattn.paged import PagedKVCacheManager

HIDDEN, HEADS, KV, DIM = 32, 4, 2, 8
with torch.no_grad():
    FLEX_MISSING = get_backend("flex").supports(torch.empty(1, 1, 1, 8), torch.empty(1, 1, 1, 8), AttentionSpec(1.0))
KERNELS = [pytest.param(k, marks=pytest.mark.skipif(k == "flex" and FLEX_MISSING is not None, reason=str(FLEX_MISSING)))
           for k in available_backends()]
POISONS = [float("nan"), float("inf"), float("-inf")]
KV_CACHE_DTYPES = [None, "fp8", "int8"]


def _poison(layer, value: float) -> None:
    """Fill everything a layer's cache stores for K and V with `value`: codes (int8 codes, which
    cannot hold it, with their largest value) and int8 scales."""
    for t in (layer.k, layer.v, layer.k_scale, layer.v_scale):
        if t is not None:
            t.copy_(torch.full(t.shape, 127 if t.dtype == torch.int8 else value).to(t.dtype))


def _decode_steps(kernel: str, n: int) -> int:
    """flex runs prefill only (decode merges partial results, which needs a log-sum-exp flex does not return)."""
    return 0 if kernel == "flex" else n


def _module(kernel: str, **config: object) -> NeuronAttentionBase:
    torch.manual_seed(0)
    cfg = AttentionConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=DIM, learned_sinks_size=1,
                          **config)
    module = NeuronAttentionBase(cfg, layer_idx=0, kernel=kernel)
    with torch.no_grad():
        module.learned_sinks.normal_()  # type: ignore[union-attr]
        module.tkg_learned_sinks.normal_()  # type: ignore[union-attr]
    return module


def _request(seed: int, length: int) -> torch.Tensor:
    return torch.randn(1, length, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _run(module: NeuronAttentionBase, mgr, row: int, hidden: torch.Tensor, decode_steps: int) -> list[torch.Tensor]:
    """Prefill `hidden` into cache row `row`, then decode `decode_steps` tokens: every output."""
    seq_ids = torch.tensor([row])
    length = hidden.shape[1]
    outs = []
    with torch.no_grad():
        if isinstance(mgr, PagedKVCacheManager):
            mgr.reserve(seq_ids, torch.arange(length).view(1, -1))
        outs.append(module(hidden, position_ids=torch.arange(length).view(1, -1), kv_mgr=mgr, seq_ids=seq_ids).hidden_states)
        for step in range(decode_steps):
            pos = torch.tensor([[length + step]])
            if isinstance(mgr, PagedKVCacheManager):
                mgr.reserve(seq_ids, pos)
            outs.append(module(_request(100 + step, 1), position_ids=pos, kv_mgr=mgr, seq_ids=seq_ids).hidden_states)
    return outs


def _assert_same(got: list[torch.Tensor], alone: list[torch.Tensor]) -> None:
    for a, b in zip(got, alone):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # bitwise: the poisoned bytes contribute exactly nothing


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("poison", POISONS)
def test_padding_holding_non_finite_values_changes_nothing(kernel: str, poison: float) -> None:
    module = _module(kernel, sliding_window=4)
    real = _request(1, 5)
    clean = torch.cat([real, torch.zeros(1, 3, HIDDEN)], dim=1)
    dirty = torch.cat([real, torch.full((1, 3, HIDDEN), poison)], dim=1)
    valid = torch.tensor([[True] * 5 + [False] * 3])
    outs = []
    for hidden in (clean, dirty):
        mgr = KVCacheManager(module.attn_config, num_layers=1, max_batch_size=1, max_seq_len=16)
        with torch.no_grad():
            out = module(hidden, attention_mask=valid, position_ids=torch.arange(8).view(1, -1), kv_mgr=mgr).hidden_states
            steps = [module(_request(7, 1), position_ids=torch.tensor([[5]]), kv_mgr=mgr).hidden_states for _ in range(_decode_steps(kernel, 1))]
        outs.append([out[:, :5], *steps])
    _assert_same(outs[1], outs[0])


@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", [None, 4], ids=["static", "rolling"])
@pytest.mark.parametrize("poison", POISONS)
def test_a_restarted_row_carries_nothing_of_its_old_bytes(kernel: str, window: int | None, poison: float, kv_cache_dtype: str | None) -> None:
    module = _module(kernel, sliding_window=window)
    mgr = KVCacheManager(module.attn_config, num_layers=1, max_batch_size=2, max_seq_len=16, kv_cache_dtype=kv_cache_dtype)
    n = _decode_steps(kernel, 3)
    _run(module, mgr, 1, _request(2, 9), n)  # an earlier request in row 1 ...
    _poison(mgr.layer(0), poison)  # ... whose keys and values went non-finite (stale slots and row 0 included)
    row0 = [t[0].clone() for t in (mgr.layer(0).k, mgr.layer(0).v)]
    got = _run(module, mgr, 1, _request(3, 3), n)  # the next request starts over in that row
    fresh = KVCacheManager(module.attn_config, num_layers=1, max_batch_size=2, max_seq_len=16, kv_cache_dtype=kv_cache_dtype)
    alone = _run(module, fresh, 1, _request(3, 3), n)
    _assert_same(got, alone)
    assert all(torch.equal(a.view(torch.uint8), b[0].view(torch.uint8)) for a, b in zip(row0, (mgr.layer(0).k, mgr.layer(0).v)))


@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("poison", POISONS)
def test_freed_paged_blocks_carry_nothing(kernel: str, poison: float, kv_cache_dtype: str | None) -> None:
    module = _module(kernel)
    mgr = PagedKVCacheManager.for_modules([module], num_blocks=8, block_size=4, max_batch_size=2, max_seq_len=32, kv_cache_dtype=kv_cache_dtype)
    n = _decode_steps(kernel, 3)
    mgr.add_sequence(0)
    _run(module, mgr, 0, _request(2, 9), n)
    _poison(mgr.layer(0), poison)  # every block, the ones about to be freed too
    mgr.free(0)
    mgr.add_sequence(1)
    got = _run(module, mgr, 1, _request(3, 6), n)
    fresh = PagedKVCacheManager.for_modules([module], num_blocks=8, block_size=4, max_batch_size=2, max_seq_len=32,
                                            kv_cache_dtype=kv_cache_dtype)
    fresh.add_sequence(1)
    _assert_same(got, _run(module, fresh, 1, _request(3, 6), n))


def _poisoned_model(tmp_path, token: int):
    """A tiny Llama checkpoint whose embedding of `token` is Inf: any request holding it overflows."""
    from distattn.models import DecoderLM

    from test_models import family_checkpoint

    family_checkpoint("llama", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        model.embed_tokens.weight[token] = float("inf")
    return model


@pytest.mark.parametrize("entry", ["serve", "generate"])
def test_a_poisoned_request_is_reported_and_the_others_are_untouched(tmp_path, entry: str) -> None:
    from distattn.models import generate, serve

    poison = 13
    model = _poisoned_model(tmp_path, poison)
    healthy = [[5, 17, 3, 44, 9, 1, 30, 2, 8, 61, 12, 7, 7, 21, 90, 33, 2], [7, 7, 21, 90], [33, 2, 5, 80, 14, 6, 3]]
    prompts = [healthy[0], [3, 4, poison, 8], *healthy[1:]]

    def run(batch: list[list[int]]):
        if entry == "serve":  # small blocks and chunks: the poisoned request's blocks are freed and reused
            return serve(model, batch, max_new_tokens=10, max_running=2, prefill_chunk=4, block_size=4, stop_tokens=[])
        return generate(model, batch, max_new_tokens=10, stop_tokens=[])

    alone = [run([p]).tokens[0] for p in healthy]
    together = run(prompts)
    assert together.errors.keys() == {1} and "non-finite" in together.errors[1]
    assert together.tokens[1] == []
    assert [together.tokens[i] for i in (0, 2, 3)] == alone
    after = run([healthy[1]])  # the next request on the same model after it: its own tokens
    assert after.tokens[0] == alone[1] and after.errors == {}
