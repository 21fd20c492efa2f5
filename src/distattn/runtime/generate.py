"""Batched generation over a KV cache: greedy or sampled, optionally with prompt-lookup speculation.

Prompts of different lengths share one batch (batch row b = cache row b). Prefill runs
the right-padded prompts at once; each decode step feeds every row's newest token at
its own position. With `draft="prompt_lookup"`, a step feeds the newest token plus up
to `draft_len` tokens copied from where the row's last n-gram appeared before; the
longest prefix the model agrees with is accepted, plus the model's next token, so the
output equals plain greedy decoding (rejected drafts are overwritten next step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import arguments as args
from ..cache import KVCacheManager
from ..models.decoder import DecoderLM
from ..parallel.comm import rank_zeros
from .batch import pad_rows
from .drafting import ModelDrafter, lookup_draft
from .loop import Emitter, Row, Turn, take_turns
from .runner import DeviceDecoder, use_device_loop
from .sampler import Sampling, SamplingRows, seed_for, stop_tokens_of


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens of each prompt
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # forward calls after prefill
    accepted_drafts: int = 0  # draft tokens accepted (speculation)
    extra: dict = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # prompt index -> why that row stopped early (its own logits went non-finite)


def check_generation_args(
    model: DecoderLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    draft: str,
    adapter_ids: Sequence[int] | None,
    *,
    seed: int | None = None,
    stop_tokens: Sequence[int] | None = None,
    draft_len: int = 4,
    ngram: int = 2,
) -> list[list[int]]:
    """The prompts as lists of ints, after checking every argument of generate / serve (ValueError or
    TypeError naming the first bad one; nothing has run yet)."""
    vocab = model.config.vocab_size
    prompts = args.prompt_list(prompts, vocab)
    args.positive_int("max_new_tokens", max_new_tokens)
    args.real("temperature", temperature, low=0.0)
    args.real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    args.optional_int("seed", seed)
    if stop_tokens is not None:
        args.token_ids("stop_tokens", stop_tokens, vocab, allow_empty=True)
    if draft not in ("none", "prompt_lookup", "model"):
        raise ValueError(f"draft={draft!r}: use 'none', 'prompt_lookup' or 'model'")
    if draft != "none":
        args.positive_int("draft_len", draft_len)
        args.positive_int("ngram", ngram)
        if temperature != 0.0:
            raise ValueError("speculative drafts are verified greedily: use temperature=0")
    if adapter_ids is not None:
        if isinstance(adapter_ids, torch.Tensor):
            adapter_ids = adapter_ids.tolist()
        if len(adapter_ids) != len(prompts):
            raise ValueError(f"adapter_ids has {len(adapter_ids)} entries for {len(prompts)} prompts; pass one per prompt")
        n_adapters = len(model.blocks()[0].self_attn.adapter_names) if model.blocks() else 0
        for i, a in enumerate(adapter_ids):
            if isinstance(a, bool) or not isinstance(a, int) or not -1 <= a < n_adapters:
                raise ValueError(f"adapter_ids[{i}]={a!r} must be -1 (no adapter) or the index of one of the {n_adapters} loaded adapters")
    return prompts


@torch.no_grad()
def generate(
    model: DecoderLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] | None = None,
    draft: str = "none",
    draft_len: int = 4,
    ngram: int = 2,
    on_tokens: Callable[[int], None] | None = None,
    adapter_ids: Sequence[int] | None = None,
    draft_model: DecoderLM | None = None,
    cuda_graphs: bool = False,
    sync_every: int = 8,
) -> Generation:
    """Continue every prompt (see the module docstring): temperature 0 is greedy, else a `top_p` sample, prompt i
    drawn with seed + i (`runtime.sampler`: a row's draws depend on its seed, logits and positions only; seed=None
    draws one from torch's default generator). A row stops at a stop token (kept) or after max_new_tokens; stop_tokens=None: the checkpoint's end tokens
    as HF generate reads them. draft: "none", "prompt_lookup" (n-gram lookup in prompt and output) or "model" (greedy
    drafts of `draft_model`, same vocabulary); speculation verifies greedily (temperature 0). on_tokens(n): tokens
    each step made (progress bars). adapter_ids: one LoRA adapter per prompt (-1: none). Decoding without drafts
    runs on the device (`runtime.runner.DeviceDecoder`: tokens picked and rows stopped there, the host reads the rows'
    state once every `sync_every` steps); `cuda_graphs=True` captures the step once per call as a CUDA graph on a GPU
    and replays it."""
    prompts = check_generation_args(model, prompts, max_new_tokens, temperature, top_p, draft, adapter_ids, seed=seed,
                                    stop_tokens=stop_tokens, draft_len=draft_len, ngram=ngram)
    args.flag("cuda_graphs", cuda_graphs)
    args.positive_int("sync_every", sync_every)
    _check_draft_model(model, draft, draft_model)
    device = model.embed_tokens.weight.device
    adapters = None if adapter_ids is None else torch.tensor(list(adapter_ids), dtype=torch.long, device=device)
    samplings = row_samplings(len(prompts), temperature, top_p, seed)
    width = 1 + (draft_len if draft != "none" else 0)
    batch, longest = len(prompts), max(len(p) for p in prompts)
    cache = model.new_cache(batch, longest + max_new_tokens + width, speculation_width=width)
    drafter = None if draft_model is None else ModelDrafter(draft_model, batch, longest + max_new_tokens + width, width)
    emitter = Emitter(stop_tokens_of(model, stop_tokens), max_new_tokens, on_tokens)
    rows = [Row(list(p)) for p in prompts]
    result = Generation([row.out for row in rows])

    start = time.perf_counter()
    _prefill(model, prompts, rows, cache, adapters, samplings, emitter)
    result.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if use_device_loop(model, draft) and drafter is None:
        decoder = DeviceDecoder(model, cache, rows, emitter, adapters, samplings, sync_every=sync_every, graphs=cuda_graphs)
        decoder.run()
        result.decode_steps = decoder.steps
    else:
        plan = Speculation(draft, draft_len, ngram, drafter)
        result.decode_steps, result.accepted_drafts = _host_decode(model, cache, rows, emitter, samplings, adapters, plan)
    result.decode_seconds = time.perf_counter() - start
    result.errors = {i: row.error for i, row in enumerate(rows) if row.error is not None}
    return result


def row_samplings(rows: int, temperature: float, top_p: float, seed: int | None) -> list[Sampling]:
    """How each of a call's rows samples: row i with seed + i (a fresh seed drawn when a sampling call gives none, the
    same on every rank of a parallel model)."""
    base = seed_for(seed, temperature)
    if seed is None and temperature > 0:
        base = rank_zeros(base)  # drawn on every rank: all take rank 0's
    return [Sampling(temperature, top_p, base + i) for i in range(rows)]


def _check_draft_model(model: DecoderLM, draft: str, draft_model: DecoderLM | None) -> None:
    if (draft == "model") != (draft_model is not None):
        raise ValueError("draft='model' needs draft_model=<a DecoderLM>, and draft_model needs draft='model'")
    if draft_model is not None and draft_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft_model has vocab_size {draft_model.config.vocab_size}, the model {model.config.vocab_size}; they must share a tokenizer")


@dataclass(frozen=True)
class Speculation:
    """How the host loop drafts: "none", "prompt_lookup" (n-gram lookup) or "model" (`drafter`)."""

    draft: str
    draft_len: int
    ngram: int
    drafter: ModelDrafter | None


def _host_decode(
    model: DecoderLM, cache: KVCacheManager, rows: list[Row], emitter: Emitter, samplings: list[Sampling], adapters: torch.Tensor | None,
    plan: Speculation,
) -> tuple[int, int]:
    """The host loop (sampling, drafts, data-parallel decode): each step feeds every running row's newest token (and
    drafts), reads the step's logits back once (`take_turns`). Returns (steps, draft tokens accepted)."""
    device = model.embed_tokens.weight.device
    steps = accepted = 0
    while any(row.running for row in rows):
        history, active = [row.history for row in rows], [row.running for row in rows]
        if plan.drafter is not None:
            drafts = plan.drafter.propose(history, active, plan.draft_len)
        else:
            drafts = [lookup_draft(h, plan.ngram, plan.draft_len) if running and plan.draft != "none" else []
                      for h, running in zip(history, active)]
        feed, positions, valid = pad_rows([(len(h) - 1, [h[-1], *d] if running else []) for h, d, running in zip(history, drafts, active)], device)
        logits = model(feed, position_ids=positions, cache=cache, attention_mask=valid, adapter_ids=adapters)
        steps += 1
        turns = [Turn(row, 1 + len(d), d, sampling, emitter) if row.running else None for row, d, sampling in zip(rows, drafts, samplings)]
        accepted += take_turns(logits, turns)[1]
    return steps, accepted


def _prefill(
    model: DecoderLM, prompts: list[list[int]], rows: list[Row], cache: KVCacheManager, adapters: torch.Tensor | None,
    samplings: list[Sampling], emitter: Emitter,
) -> None:
    """Every prompt at once (right-padded), the lm_head on each row's last prompt token only; each row's first
    token drawn for the whole batch at once."""
    device = model.embed_tokens.weight.device
    ids, positions, valid = pad_rows([(0, p) for p in prompts], device)
    last = torch.tensor([[len(p) - 1] for p in prompts], device=device)
    logits = model(ids, position_ids=positions, cache=cache, attention_mask=valid, adapter_ids=adapters, logits_at=last)
    finite = torch.isfinite(logits[:, 0]).all(-1).tolist()
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # each first new token's index
    pending = SamplingRows.of(samplings, device).sample(torch.nan_to_num(logits[:, 0]), lengths).tolist()
    for row, token, ok in zip(rows, pending, finite):
        if not emitter.fail_if_non_finite(row, [ok]):
            emitter.emit(row, token)


def generate_greedy(model: DecoderLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_tokens: Sequence[int] | None = None) -> list[list[int]]:
    """The new tokens of plain greedy decoding (see `generate`)."""
    return generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens).tokens
