"""The paged KV cache gives exactly the static cache's outputs: chunked prefill mixed with decode,
prefix-cache hits and misses, speculation with rejected drafts, forked sequences (copy on write),
window / chunk / full layers; and its blocks are accounted for."""

from __future__ import annotations

import pytest
import torch

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase
from distattn.hf import hf_attention_shapes
from distattn.paged import PagedKVCacheManager, PoolExhausted

import tolerances

HIDDEN, VOCAB, BLOCK, MAX_LEN = 32, 50, 4, 48
CONFIGS = {
    "full+sinks": dict(learned_sinks_size=1, qkv_bias=True),
    "window": dict(sliding_window=5, learned_sinks_size=1),
    "chunk": dict(attention_chunk_size=6),
    "fused+qknorm": dict(fused_qkv=True, qk_norm="rmsnorm"),
}


class Pair:
    """A module driven over a paged and a static cache with the same tokens; outputs compared every call."""

    def __init__(self, fields: dict, num_blocks: int = 64, block_size: int = BLOCK) -> None:
        self.cfg = AttentionConfig(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, head_dim=8, **fields)
        gen = torch.Generator().manual_seed(0)
        self.module = NeuronAttentionBase(self.cfg, dtype=torch.float64)
        self.module.load_hf_state_dict({n: 0.3 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in hf_attention_shapes(self.cfg).items()})
        self.embed = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64)
        self.paged = PagedKVCacheManager.for_modules([self.module], num_blocks=num_blocks, block_size=block_size, max_batch_size=8, max_seq_len=MAX_LEN)
        # the static reference's rolling caches keep room for 6 rejected drafts (the paged cache needs no such setting)
        self.static = KVCacheManager.for_modules([self.module], max_batch_size=8, max_seq_len=MAX_LEN, speculation_width=7)
        self.tokens: dict[int, list[int]] = {}  # every token each sequence has fed, by position

    def run(self, rows: list[tuple[int, int, list[int]]], *, static_rows: list[tuple[int, int, list[int]]] | None = None) -> None:
        """One forward over rows (seq_id, first position, tokens) on both caches; static_rows lets the static
        side compute more (a whole prompt where the paged side had a prefix hit)."""
        got = self._forward(self.paged, rows, reserve=True)
        expected = self._forward(self.static, static_rows or rows, reserve=False)
        for (seq, start, tokens), g in zip(rows, got):
            s_start, e = next((st, out) for (sq, st, _), out in zip(static_rows or rows, expected) if sq == seq)
            e = e[start - s_start : start - s_start + len(tokens)]
            # fp64 both sides; gathered blocks vs slots only reorder the softmax sums
            assert (g - e).abs().max().item() <= tolerances.FP64, f"sequence {seq} at {start}"
        for seq, start, tokens in rows:
            self.tokens[seq] = self.tokens.get(seq, [])[:start] + tokens

    def _forward(self, mgr, rows, *, reserve: bool) -> list[torch.Tensor]:
        width = max(len(t) for _, _, t in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, (_, _, tokens) in enumerate(rows):
            ids[b, : len(tokens)] = torch.tensor(tokens)
            valid[b, : len(tokens)] = True
        pos = torch.tensor([start for _, start, _ in rows]).unsqueeze(1) + torch.arange(width)
        seq_ids = torch.tensor([seq for seq, _, _ in rows])
        if reserve:
            mgr.reserve(seq_ids, pos, valid)
        out = self.module(self.embed[ids], attention_mask=valid, position_ids=pos, kv_mgr=mgr, idx=0, seq_ids=seq_ids).hidden_states
        return [out[b, : len(t)] for b, (_, _, t) in enumerate(rows)]


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("fields", CONFIGS.values(), ids=CONFIGS.keys())
def test_paged_equals_static(fields: dict) -> None:
    pair = Pair(fields)
    a, b = tokens(1, 30), tokens(2, 30)
    paged = pair.paged
    assert paged.add_sequence(0, a[:13]) == 0 and paged.add_sequence(1, b[:6]) == 0  # misses: nothing cached yet
    # chunked prefill of A (5 tokens a call), mixed with B's whole prompt, then with B's decode
    pair.run([(0, 0, a[:5])])
    pair.run([(0, 5, a[5:10]), (1, 0, b[:6])])
    pair.run([(1, 6, b[6:7]), (0, 10, a[10:13])])
    paged.commit(0, a[:13])
    # C shares A's first 10 tokens: a hit of 2 whole blocks (8 tokens); it prefills only the rest
    c = a[:10] + tokens(3, 20)
    hit = paged.add_sequence(2, c[:13])
    assert hit == 8 and paged.hit_tokens == 8
    pair.run([(2, hit, c[hit:13]), (0, 13, a[13:14]), (1, 7, b[7:8])], static_rows=[(2, 0, c[:13]), (0, 13, a[13:14]), (1, 7, b[7:8])])
    # speculation: B writes 3 tokens, only the first is accepted, the next step rewrites from there
    pair.run([(1, 8, [b[8], 7, 9]), (2, 13, c[13:14])])
    pair.run([(1, 9, b[9:12]), (0, 14, a[14:15])])
    pair.run([(1, 12, b[12:13]), (0, 15, a[15:16])])
    # fork: D continues from B's 13 tokens, sharing its partly filled last block; each writes its own next token
    paged.fork(1, 3)
    for layer in pair.static.layers:
        layer.k[3], layer.v[3], layer.positions[3] = layer.k[1], layer.v[1], layer.positions[1]
    d = b[:13] + tokens(4, 10)
    pair.run([(1, 13, b[13:14]), (3, 13, d[13:14])])
    pair.run([(3, 14, d[14:17]), (1, 14, b[14:15]), (2, 14, c[14:15])])
    # decode everyone a while: window / chunk layers cross many blocks and release the old ones
    for step in range(6):
        pair.run([(0, 16 + step, a[16 + step : 17 + step]), (2, 15 + step, c[15 + step : 16 + step]), (1, 15 + step, b[15 + step : 16 + step])])
    group = next(iter(paged.groups.values()))
    held = [sum(x is not None for x in group.tables[s]) for s in (0, 1, 2, 3)]
    if group.kind == "full":
        assert held[0] == -(-22 // BLOCK)  # A's 22 positions
    else:  # only what a query can still see (a window or chunk) plus the block being filled
        assert max(held) <= group.limit // BLOCK + 2
    for seq in range(4):
        paged.free(seq)
    assert paged.blocks_in_use() == 0


@pytest.mark.parametrize("fields", [CONFIGS["full+sinks"], CONFIGS["window"]], ids=["full", "window"])
def test_reused_blocks_hold_nothing_of_their_last_owner(fields: dict) -> None:
    """A small pool cycles: blocks come back at other table indices, their old positions must not leak."""
    pair = Pair(fields, num_blocks=7)
    a, b = tokens(7, 24), tokens(8, 30)
    pair.run([(0, 0, a[:22])])  # 6 blocks of 4, the last one half full
    pair.paged.free(0)
    pair.run([(1, 0, b[:3])])  # takes the unused block, then A's old ones in release order
    for p in range(3, 27):
        pair.run([(1, p, b[p : p + 1])])


def test_block_tables_and_slot_mapping() -> None:
    """A prefix hit maps the shared positions to the first sequence's slots; new positions get their own."""
    pair = Pair(CONFIGS["full+sinks"])
    a = tokens(9, 14)
    pair.run([(0, 0, a)])
    pair.paged.commit(0, a)
    b = a[:9] + tokens(10, 3)
    assert pair.paged.add_sequence(1, b) == 8
    positions, valid = torch.arange(8, 12).unsqueeze(0), torch.ones(1, 4, dtype=torch.bool)
    pair.paged.reserve([1], positions, valid)
    layer = pair.paged[0]
    tables = layer.block_table(torch.tensor([0, 1]), 2)
    assert tables[0, :2].tolist() == tables[1, :2].tolist()  # the two shared blocks
    assert tables[1, 2] not in tables[0].tolist()  # its own block from position 8 on
    slots = layer.slot_mapping(torch.tensor([1]), positions, valid.masked_fill(torch.tensor([[False, False, False, True]]), False))
    assert slots[0, :3].tolist() == [int(tables[1, 2]) * BLOCK + p for p in range(3)] and slots[0, 3] == -1
    pair.run([(1, 8, b[8:])], static_rows=[(1, 0, b)])


def test_a_hit_is_refused_for_another_cache_key_and_found_after_release() -> None:
    pair = Pair(CONFIGS["window"])
    a = tokens(5, 20)
    pair.paged.add_sequence(0, a, cache_key="adapter-0")
    pair.run([(0, 0, a)])
    pair.paged.commit(0, a)
    assert pair.paged.add_sequence(1, a, cache_key="adapter-1") == 0  # K/V of another adapter differ: a miss
    pair.paged.free(0)  # released blocks stay cached until their memory is reused
    assert pair.paged.add_sequence(2, a, cache_key="adapter-0") == 16  # the last token is always computed
    pair.run([(2, 16, a[16:])], static_rows=[(2, 0, a)])


def test_reservation_errors_change_nothing() -> None:
    pair = Pair(CONFIGS["full+sinks"], num_blocks=4)
    x = pair.embed[torch.tensor([tokens(6, 9)])]
    with pytest.raises(ValueError, match=r"have no KV cache block of their own; call kv_mgr.reserve\(seq_ids, position_ids, attention_mask\)"):
        pair.module(x, position_ids=torch.arange(9).unsqueeze(0), kv_mgr=pair.paged, idx=0)
    before = pair.paged.layers[0].positions.clone()
    with pytest.raises(PoolExhausted, match=r"needs 5 more blocks for full layers but 4 are free \(num_blocks=4\)"):
        pair.paged.reserve(torch.tensor([0]), torch.arange(17).unsqueeze(0))
    assert pair.paged.blocks_in_use() == 0 and torch.equal(before, pair.paged.layers[0].positions)
    with pytest.raises(ValueError, match=r"seq_ids \[1, 1\] must name 2 different sequences"):
        pair.paged.reserve(torch.tensor([1, 1]), torch.zeros(2, 1, dtype=torch.long))


# ---- serving: continuous batching over the paged cache equals generate over the static cache ------------

from distattn.models import DecoderLM, generate, serve  # noqa: E402

from test_models import family_checkpoint  # noqa: E402

SYSTEM = [11, 4, 29, 60, 2, 17, 33, 8, 71, 5, 40, 3, 19, 26, 7, 50, 13, 9]  # a shared prompt prefix (18 tokens)
REQUESTS = [SYSTEM + [44, 1, 30], [7, 7, 21, 90, 5], SYSTEM + [61, 12], SYSTEM + [44, 1, 30, 2, 8], [33, 2, 5, 80, 14, 6, 3, 70, 12, 1, 9]]


@pytest.mark.parametrize("family,draft", [("llama", "none"), ("mistral", "none"), ("mistral", "prompt_lookup")])
def test_serving_equals_static_generate(tmp_path, family: str, draft: str) -> None:
    """Mistral has sliding-window layers (window 6 < prompts); 2 rows at a time, prompts fed 5 tokens a step,
    so chunked prefill shares calls with decode and later requests hit the committed prefix."""
    family_checkpoint(family, tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)  # fp64: no argmax ties
    expected = generate(model, REQUESTS, max_new_tokens=10, stop_tokens=[], draft=draft).tokens
    got = serve(model, REQUESTS, max_new_tokens=10, stop_tokens=[], draft=draft, max_running=2, prefill_chunk=5, block_size=4)
    assert got.tokens == expected
    assert got.extra["cached_prompt_tokens"] == 16 + 20  # requests 2 and 3 reuse 4 and 5 blocks of request 0's prompt
    assert got.extra["mixed_steps"] >= 3  # request 0's prompt chunks ride along request 1's decode
    cold = serve(model, REQUESTS, max_new_tokens=10, stop_tokens=[], draft=draft, max_running=2, prefill_chunk=5, block_size=4, prefix_caching=False)
    assert cold.tokens == expected and cold.extra["cached_prompt_tokens"] == 0


@pytest.mark.parametrize("draft", ["none", "prompt_lookup"])
def test_serving_a_model_with_chunked_and_full_layers(tmp_path, draft: str) -> None:
    """Llama 4's pattern: layer 0 chunked (chunk 6), layer 1 full, so one manager holds two block groups;
    generated ids equal the static cache's, with prefix hits, chunked prefill and speculation."""
    import dataclasses

    family_checkpoint("llama", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)
    old = model.layers[0].self_attn
    chunked = NeuronAttentionBase(dataclasses.replace(old.config, attention_chunk_size=6), layer_idx=0, dtype=torch.float64)
    chunked.load_state_dict(old.state_dict())
    model.layers[0].self_attn = chunked
    expected = generate(model, REQUESTS, max_new_tokens=10, stop_tokens=[], draft=draft).tokens
    got = serve(model, REQUESTS, max_new_tokens=10, stop_tokens=[], draft=draft, max_running=2, prefill_chunk=5, block_size=4)
    assert got.tokens == expected
    assert got.extra["cached_prompt_tokens"] > 0 and got.extra["mixed_steps"] > 0
    assert expected != generate(DecoderLM.from_pretrained(tmp_path, dtype=torch.float64), REQUESTS, max_new_tokens=10, stop_tokens=[]).tokens


def test_a_small_pool_preempts_and_recomputes_with_the_same_tokens(tmp_path) -> None:
    """12 blocks of 4 cannot hold 3 requests of ~30 positions at once: requests are preempted, start over
    from their prompt and output so far, and every token still equals generate's."""
    family_checkpoint("llama", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)
    expected = generate(model, REQUESTS, max_new_tokens=10, stop_tokens=[]).tokens
    got = serve(model, REQUESTS, max_new_tokens=10, stop_tokens=[], max_running=3, prefill_chunk=5, block_size=4, num_blocks=12)
    assert got.tokens == expected
    assert got.extra["preemptions"] > 0 and got.extra["peak_blocks"] <= 12
    with pytest.raises(ValueError, match=r"plus max_new_tokens \(10\) can never fit this engine's KV cache: it needs up to 8 blocks "
                                         r"of 4 tokens in the full-attention layers' pool, which has 4"):
        serve(model, REQUESTS[:1], max_new_tokens=10, stop_tokens=[], block_size=4, num_blocks=4)  # refused at add, never wedged


def test_serving_with_lora_keeps_prefixes_per_adapter(tmp_path) -> None:
    peft = pytest.importorskip("peft")  # noqa: F841 (the adapters are saved by peft)
    from test_lora import save_peft_adapters

    hf = family_checkpoint("llama", tmp_path / "base")
    paths = save_peft_adapters(hf, tmp_path)
    model = DecoderLM.from_pretrained(tmp_path / "base", dtype=torch.float64)
    model.load_lora_adapters(paths)
    adapter_ids = [0, -1, 1, 0, -1]  # request 2 shares request 0's tokens but not its adapter: no hit
    expected = generate(model, REQUESTS, max_new_tokens=8, stop_tokens=[], adapter_ids=adapter_ids).tokens
    got = serve(model, REQUESTS, max_new_tokens=8, stop_tokens=[], adapter_ids=adapter_ids, max_running=2, prefill_chunk=5, block_size=4)
    assert got.tokens == expected
    assert got.extra["cached_prompt_tokens"] == 20  # only request 3 (adapter 0) reuses request 0's blocks


# ---- random schedules: the paged cache against the static one, call by call ----------------------------

from collections import Counter  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LIMIT = 40  # positions a sequence may reach (MAX_LEN = 48 leaves room for a speculative step)
COVERAGE: Counter = Counter()  # what the examples exercised (test_the_random_schedules_cover_every_action)


@st.composite
def schedules(draw):
    """Steps of (action, sequence, length, accepted) over 3 sequences."""
    steps = []
    for _ in range(draw(st.integers(4, 14))):
        steps.append((draw(st.sampled_from(["feed", "feed", "speculate", "speculate", "restart", "fork", "hit"])), draw(st.integers(0, 2)),
                      draw(st.integers(1, 6)), draw(st.integers(1, 6))))
    return steps


@settings(max_examples=25)  # each example builds a module and runs up to 14 calls (~0.1 s)
@given(route=st.sampled_from(["full+sinks", "window", "chunk"]), block=st.integers(2, 5), schedule=schedules(), seed=st.integers(0, 2**16))
def test_random_schedules_match_the_static_cache(route: str, block: int, schedule: list, seed: int) -> None:
    """Prompt chunks, decode tokens and speculative steps with rejected drafts, mixed in calls; restarts,
    forks (copy on write) and prefix hits; every output equals the static cache's, and blocks never leak."""
    pair = Pair(CONFIGS[route], num_blocks=96, block_size=block)
    truth = {s: tokens(seed + s, LIMIT + 8) for s in range(4)}
    length = {}  # tokens each sequence has in the cache
    for action, seq, n, accepted in schedule:
        if action == "fork" and seq in length and 3 not in length:
            pair.paged.fork(seq, 3)
            COVERAGE["fork"] += 1
            for layer in pair.static.layers:
                layer.k[3], layer.v[3], layer.positions[3] = layer.k[seq], layer.v[seq], layer.positions[seq]
            truth[3] = truth[seq][: length[seq]] + tokens(seed + 7, LIMIT + 8)[length[seq]:]
            length[3] = length[seq]
            continue
        if action == "hit" and 0 in length and seq != 0 and length[0] > block:
            pair.paged.commit(0, truth[0][: length[0]])
            truth[seq] = truth[0][: length[0]] + tokens(seed + 11 + seq, LIMIT + 8)[length[0]:]
            prompt = truth[seq][: min(length[0] + n, LIMIT)]
            hit = pair.paged.add_sequence(seq, prompt)
            if route == "full+sinks":  # full layers keep every block: all of sequence 0's full blocks are found
                assert hit == length[0] // block * block
            COVERAGE["hit tokens"] += hit
            pair.run([(seq, hit, prompt[hit:])], static_rows=[(seq, 0, prompt)])
            length[seq] = len(prompt)
            continue
        start = 0 if action == "restart" or seq not in length else length[seq]
        if start + n > LIMIT:
            continue
        if action == "speculate" and seq in length:  # the first `accepted` tokens are right, the rest are rejected drafts
            keep = min(accepted, n - 1) if n > 1 else 1  # at least one draft rejected when there is one
            feed = truth[seq][start : start + keep] + [(t + 1) % VOCAB for t in truth[seq][start + keep : start + n]]
            pair.run([(seq, start, feed)])
            length[seq] = start + keep
            COVERAGE["rejected drafts"] += n - keep
        else:
            others = [(s, length[s], truth[s][length[s] : length[s] + 1]) for s in length if s != seq and length[s] < LIMIT]
            pair.run([(seq, start, truth[seq][start : start + n]), *others[:1]])  # mixed with another sequence's decode token
            COVERAGE["restart" if action == "restart" and seq in length else "mixed calls" if others else "feed"] += 1
            length[seq] = start + n
            if others:
                length[others[0][0]] += 1
    for seq in range(4):
        pair.paged.free(seq)
    assert pair.paged.blocks_in_use() == 0


def test_the_random_schedules_cover_every_action() -> None:
    """Runs after the property test (file order): its examples did exercise each kind of step."""
    if not COVERAGE:
        pytest.skip("the random-schedule test did not run in this session")
    for what in ("fork", "rejected drafts", "restart", "mixed calls", "hit tokens"):
        assert COVERAGE[what] > 0, f"no example exercised {what}: {dict(COVERAGE)}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paged_cache_with_lora_matches_the_cpu() -> None:
    """The paged cache and multi-LoRA on CUDA give the CPU's outputs (fp64 both sides)."""
    from test_lora import random_adapter

    outputs = []
    for device in ("cpu", "cuda"):
        pair = Pair(CONFIGS["window"])
        pair.module.load_lora_adapters([random_adapter(pair.cfg, 4, ("q_proj", "o_proj"), 1.0, seed=1)])
        module = pair.module.to(device)
        cache = PagedKVCacheManager.for_modules([module], num_blocks=32, block_size=4, max_batch_size=2, max_seq_len=MAX_LEN)
        x = pair.embed[torch.tensor([tokens(1, 20), tokens(2, 20)])].to(device)
        got = []
        for start, width in ((0, 11), (11, 1), (12, 3), (13, 1)):  # prefill, decode, a rejected speculation, decode
            pos = torch.arange(start, start + width, device=device).expand(2, -1)
            cache.reserve(None, pos)
            got.append(module(x[:, start : start + width], position_ids=pos, kv_mgr=cache, idx=0,
                              adapter_ids=torch.tensor([0, -1], device=device)).hidden_states.cpu())
        outputs.append(got)
    for cpu, cuda in zip(*outputs):
        assert (cpu - cuda).abs().max().item() <= tolerances.FP64  # fp64: only the summation order differs


def test_a_cached_block_is_copied_before_its_owner_rewrites_it() -> None:
    """A sequence rewinds into blocks it committed (a rejected continuation): its writes go to copies,
    and a later request still finds the committed prefix intact."""
    pair = Pair(CONFIGS["full+sinks"])
    a = tokens(12, 16)
    pair.run([(0, 0, a[:12])])
    pair.paged.commit(0, a[:12])  # blocks 0..2 are in the prefix cache
    cached = pair.paged[0].block_table(torch.tensor([0]), 1)[0, :3].tolist()
    other = [(t + 1) % VOCAB for t in a[6:12]]
    pair.run([(0, 6, other)])  # rewrite positions 6..11 with other tokens
    assert pair.paged[0].block_table(torch.tensor([0]), 1)[0, 1:3].tolist() != cached[1:]
    assert pair.paged.add_sequence(1, a[:13]) == 12  # the committed blocks still hold a's prefix
    pair.run([(1, 12, a[12:13])], static_rows=[(1, 0, a[:13])])


def test_requests_with_one_prompt_share_its_blocks(tmp_path) -> None:
    """Three requests of one prompt (an OpenAI request with n=3): the first prefills it, the others wait for its blocks
    to enter the prefix cache and reuse every full one; greedy tokens equal generate's for each."""
    family_checkpoint("llama", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, dtype=torch.float64)
    prompt = list(range(3, 23))  # 20 tokens: 4 full blocks of 4 are shared (the last token is always fed)
    expected = generate(model, [prompt], max_new_tokens=6, stop_tokens=[]).tokens[0]
    got = serve(model, [prompt] * 3, max_new_tokens=6, stop_tokens=[], prefill_chunk=8, block_size=4)
    assert got.tokens == [expected] * 3
    assert got.extra["cached_prompt_tokens"] == 2 * 16
