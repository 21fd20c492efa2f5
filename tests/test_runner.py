"""The device decode loop (`runtime.runner.DeviceDecoder`): the host loop's tokens, no host sync inside a step,
the host reads the rows' state once every `sync_every` steps; on CUDA, graph replay equals the eager device loop."""

from __future__ import annotations

import pytest
import torch

from distattn.models import DecoderLM, generate
from distattn.runtime.batch import pad_rows
from distattn.runtime.loop import Emitter, Row
from distattn.runtime.runner import DeviceDecoder
from distattn.runtime.sampler import Sampling, exponential_noise, sample
from test_models import family_checkpoint
from test_step import SYNCING, HostSyncs

PROMPTS = [[5, 17, 3, 44, 9, 1, 30], [7, 7, 21], [33, 2, 5, 80, 14, 6, 2, 9, 11], [4, 50]]


def host_loop(model: DecoderLM, prompts: list[list[int]], new: int, stops: set[int], dtype_cache: str | None = None) -> list[list[int]]:
    """Greedy decoding one forward per step through DecoderLM.forward, rows that stopped fed as padding: the reference."""
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + new + 1)
    ids, positions, valid = pad_rows([(0, p) for p in prompts], torch.device("cpu"))
    last = torch.tensor([[len(p) - 1] for p in prompts])
    first = model(ids, position_ids=positions, cache=cache, attention_mask=valid, logits_at=last)[:, 0].argmax(-1).tolist()
    out = [[t] for t in first]
    running = [t not in stops and new > 1 for t in first]
    while any(running):
        rows = [(len(p) + len(o) - 1, [o[-1]] if r else []) for p, o, r in zip(prompts, out, running)]
        feed, positions, valid = pad_rows(rows, torch.device("cpu"))
        picks = model(feed, position_ids=positions, cache=cache, attention_mask=valid)[:, 0].argmax(-1).tolist()
        for b, token in enumerate(picks):
            if running[b]:
                out[b].append(token)
                running[b] = token not in stops and len(out[b]) < new
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt_oss", "gemma3", "llama4"])
def test_device_loop_equals_the_host_loop(family: str, tmp_path) -> None:
    """Every family (windows, chunks, sinks, MoE, soft-capping), fp32, a stop token that ends one row early: the tokens
    of the device loop equal a plain host loop over DecoderLM.forward, for several host-read intervals."""
    family_checkpoint(family, tmp_path)
    model = DecoderLM.from_pretrained(tmp_path)
    free = host_loop(model, PROMPTS, 12, set())
    stop = free[1][4]  # row 1 stops at its fifth token (others may stop earlier where they make it too)
    expected = host_loop(model, PROMPTS, 12, {stop})
    assert expected != free
    for every in (1, 5, 8):
        assert generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[stop], sync_every=every).tokens == expected


def test_quantized_rolling_cache_and_length_limits(tmp_path) -> None:
    """An int8 KV cache and a sliding window (rolling cache): device loop = host loop; max_new_tokens=1 makes no decode step."""
    family_checkpoint("mistral", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path, kv_cache_dtype="int8")
    assert generate(model, PROMPTS, max_new_tokens=10, stop_tokens=[]).tokens == host_loop(model, PROMPTS, 10, set())
    one = generate(model, PROMPTS, max_new_tokens=1, stop_tokens=[])
    assert one.decode_steps == 0 and all(len(t) == 1 for t in one.tokens)


def test_a_decode_step_makes_no_host_sync_and_the_loop_reads_once_per_interval(tmp_path, monkeypatch) -> None:
    """Inside a step nothing is read back (no item / tolist / nonzero / data-dependent shape); the loop reads the rows'
    state once every sync_every steps (2 reads: produced counts and running flags) and the tokens once at the end."""
    family_checkpoint("llama", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path)
    cache = model.new_cache(len(PROMPTS), 40)
    ids, positions, valid = pad_rows([(0, p) for p in PROMPTS], torch.device("cpu"))
    last = torch.tensor([[len(p) - 1] for p in PROMPTS])
    first = model(ids, position_ids=positions, cache=cache, attention_mask=valid, logits_at=last)[:, 0].argmax(-1).tolist()
    rows = [Row(list(p) + [t], [t]) for p, t in zip(PROMPTS, first)]
    decoder = DeviceDecoder(model, cache, rows, Emitter(set(), 17), None, [Sampling()] * len(rows), sync_every=4)
    with HostSyncs() as syncs:
        for _ in range(3):
            decoder.step()
    assert syncs.count == 0, syncs.ops
    reads = []
    original = torch.Tensor.tolist

    def counted(self: torch.Tensor) -> object:
        reads.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    decoder.run()
    monkeypatch.undo()
    # 16 tokens after the first, 3 already made above: 13 steps in intervals of 4 (4 + 4 + 4 + 1), 2 reads each,
    # then out, produced and failed_at once
    assert len(reads) == 2 * 4 + 3, reads
    assert all(len(row.out) == 17 for row in rows)
    assert SYNCING  # the op set the step was checked against


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_the_eager_device_loop(tmp_path) -> None:
    """On CUDA the step is captured once and replayed: the same tokens as the eager device loop, fp32 and bf16,
    with a stop token and LoRA-free rows of different lengths."""
    family_checkpoint("llama", tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        model = DecoderLM.from_pretrained(tmp_path, dtype=dtype, pack=False).to("cuda")
        eager = generate(model, PROMPTS, max_new_tokens=20, stop_tokens=[]).tokens
        stop = eager[2][6]
        assert generate(model, PROMPTS, max_new_tokens=20, stop_tokens=[], cuda_graphs=True).tokens == eager
        assert generate(model, PROMPTS, max_new_tokens=20, stop_tokens=[stop], cuda_graphs=True).tokens == \
            generate(model, PROMPTS, max_new_tokens=20, stop_tokens=[stop]).tokens


def test_device_sampling_draws_each_token_with_its_probability() -> None:
    """The exponential race argmax(p / E) over the hashed noise draws token v with probability p_v (temperature applied,
    top-p's tail never drawn): frequencies over 40,000 draws (one row, successive token indices) within 5 standard
    errors of the probabilities; the same (seed, index), the same draw; greedy rows beside sampled ones stay argmaxes."""
    n = 40_000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(n, -1)
    seeds, indices = torch.full((n,), 7), torch.arange(n)
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.8)):
        probs = torch.softmax(logits[0].double() / temperature, -1)
        if top_p < 1.0:  # the nucleus: the smallest set of most likely tokens whose mass reaches top_p
            keep = (probs.cumsum(-1) - probs) <= top_p
            probs = torch.where(keep, probs, 0.0) / probs[keep].sum()
        top = None if top_p == 1.0 else torch.full((n,), top_p)
        draws = sample(logits, torch.full((n,), temperature), top, seeds, indices)
        freq = torch.bincount(draws, minlength=6).double() / n
        bound = 5 * (probs * (1 - probs) / n).sqrt() + 1e-12  # 5 standard errors of a frequency
        assert bool(((freq - probs).abs() <= bound).all()), (temperature, top_p, freq, probs)
        assert torch.equal(sample(logits, torch.full((n,), temperature), top, seeds, indices), draws)
    mixed = sample(logits[:4], torch.tensor([0.0, 1.0, 0.0, 1.0]), None, seeds[:4], indices[:4])
    assert mixed[0] == 0 and mixed[2] == 0


def test_the_sampling_noise_is_exponential_and_independent_across_seeds_indices_and_entries() -> None:
    """Exponential(1) noise: mean and variance 1 within 5 standard errors over 2**20 values, and no correlation between
    neighbouring seeds, neighbouring indices or neighbouring vocabulary entries (|r| under 5 / sqrt(n))."""
    noise = exponential_noise(torch.arange(64), torch.full((64,), 3), 16384)  # [64 seeds, 16384 entries]
    flat = noise.flatten()
    se = 1 / flat.numel() ** 0.5
    assert abs(flat.mean().item() - 1) < 5 * se and abs(flat.var().item() - 1) < 5 * 8**0.5 * se  # var of E's square: 8
    by_index = exponential_noise(torch.zeros(64, dtype=torch.long), torch.arange(64), 16384)

    def r(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    bound = 5 / (63 * 16384) ** 0.5
    assert abs(r(noise[1:], noise[:-1])) < bound and abs(r(by_index[1:], by_index[:-1])) < bound
    assert abs(r(noise[:, 1:], noise[:, :-1])) < 5 / (64 * 16383) ** 0.5


def test_sampled_generation_runs_on_the_device_reproducibly(tmp_path) -> None:
    """Sampled generate decodes through the device loop: the same seed gives the same tokens, another seed others;
    prompt i draws with seed + i whatever else is in the batch (alone with seed + i: the same tokens); the host
    loop (data-parallel decode, drafts) and the serving Engine draw the same tokens; a top_p that keeps one token is
    greedy."""
    from distattn.models import serve
    from distattn.runtime.generate import Speculation, _host_decode, _prefill

    family_checkpoint("llama", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path)
    a = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3, stop_tokens=[]).tokens
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3, stop_tokens=[], sync_every=3).tokens == a
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=4, stop_tokens=[]).tokens != a
    assert generate(model, PROMPTS[2:3], max_new_tokens=10, temperature=1.0, seed=5, stop_tokens=[]).tokens == a[2:3]
    assert serve(model, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3, stop_tokens=[]).tokens == a
    rows, emitter = [Row(list(p)) for p in PROMPTS], Emitter(set(), 10)
    samplings = [Sampling(1.0, 1.0, 3 + i) for i in range(len(PROMPTS))]
    cache = model.new_cache(len(PROMPTS), 30)
    _prefill(model, PROMPTS, rows, cache, None, samplings, emitter)
    _host_decode(model, cache, rows, emitter, samplings, None, Speculation("none", 0, 2, None))
    assert [row.out for row in rows] == a
    narrow = generate(model, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-9, seed=5, stop_tokens=[]).tokens
    assert narrow == host_loop(model, PROMPTS, 10, set())


def test_progress_reporting_does_not_change_the_steps(tmp_path) -> None:
    """Under tensor parallelism only rank 0 reports progress (on_tokens): every rank must still take the same steps
    (each step all-reduces), so the steps and reads depend on sync_every alone; on_tokens hears of every token."""
    family_checkpoint("llama", tmp_path)
    model = DecoderLM.from_pretrained(tmp_path)
    stops = [t[3] for t in generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[]).tokens]  # every row stops by its 4th token
    heard: list[int] = []
    quiet = generate(model, PROMPTS, max_new_tokens=12, stop_tokens=stops)
    loud = generate(model, PROMPTS, max_new_tokens=12, stop_tokens=stops, on_tokens=heard.append)
    assert max(len(t) for t in quiet.tokens) <= 4 and quiet.decode_steps == 8  # one interval of sync_every=8 steps, then one read
    assert loud.tokens == quiet.tokens and loud.decode_steps == quiet.decode_steps
    assert sum(heard) == sum(len(t) for t in quiet.tokens)
