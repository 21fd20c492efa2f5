"""Continuous batching over the paged KV cache: chunked prefill mixed with decode, prefix caching.

Requests are admitted in order while fewer than `max_running` run. An admitted
request first looks its prompt up in the prefix cache and skips the cached blocks;
then each step feeds every running request in one forward call: a prefilling
request its next `prefill_chunk` prompt tokens, a decoding request its newest token
(plus prompt-lookup drafts). Each prefill chunk's full blocks are committed to the
prefix cache as soon as they are written. When the block pool runs out, the latest
admitted request is preempted: its blocks are freed and it starts over later from
its prompt and the tokens it produced (recomputed, often from the prefix cache). A
finished request frees its blocks (they stay cached until reused).
Greedy decoding gives exactly the tokens of `generate` over the static cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import arguments as args
from ..cache import PagedKVCacheManager, PoolExhausted
from ..models.decoder import DecoderLM
from .batch import pad_rows
from .drafting import lookup_draft
from .generate import Generation, check_generation_args, row_samplings
from .loop import Emitter, Row, Turn, take_turns
from .sampler import LogitRules, Sampling, TokenLogprob, seed_for, stop_tokens_of, token_logprobs


@dataclass
class Request(Row):
    """One request in the engine: its prompt, sampling settings, and what it has produced so far."""

    prompt: list[int] = field(default_factory=list)
    adapter: int = -1  # LoRA adapter (-1: none)
    seq_id: int = -1  # cache row while running
    fed: int = 0  # prompt tokens in the cache
    sampling: Sampling = Sampling()
    emitter: Emitter = Emitter(set(), 1)
    cancelled: bool = False  # set by `Engine.cancel`: freed at the next step
    finish_reason: str | None = None  # "stop", "length", "error" or "cancelled", once finished
    on_token: Callable[[Request, int], None] | None = None  # called with every produced token (from the engine's thread)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # prompt token i's log-probability given tokens < i (None at 0)
    prompt_top: int = 0  # alternatives reported with each prompt token


MAX_LOGPROBS = 20  # alternatives a request may ask for with each token (vLLM's default limit)
StepRow = tuple[Request, int, list[int], list[int]]  # (request, first position, tokens fed, drafts)


class Engine:
    """Continuous batching over the paged KV cache, one `step` at a time (see the module docstring).

    `add` checks and queues a request; `step` admits waiting requests while rows are free, feeds every
    running request in one forward call (prompt chunks and decode tokens together), samples, and frees
    finished requests' blocks. `serve` runs it to completion over a list of prompts; `distattn serve`
    runs it in a loop behind an HTTP server. Not thread-safe: one thread calls add / cancel / step.
    """

    def __init__(
        self,
        model: DecoderLM,
        *,
        max_seq_len: int,
        max_running: int = 8,
        prefill_chunk: int = 64,
        block_size: int = 16,
        num_blocks: int | None = None,
        prefix_caching: bool = True,
        draft: str = "none",
        draft_len: int = 4,
        ngram: int = 2,
    ) -> None:
        for name, value in (("max_running", max_running), ("prefill_chunk", prefill_chunk), ("block_size", block_size),
                            ("max_seq_len", max_seq_len)):
            args.positive_int(name, value)
        if num_blocks is not None:
            args.positive_int("num_blocks", num_blocks)
        args.flag("prefix_caching", prefix_caching)
        if draft not in ("none", "prompt_lookup"):
            raise ValueError(f"draft={draft!r}: the engine drafts with 'prompt_lookup' or not at all ('none')")
        if draft != "none":
            args.positive_int("draft_len", draft_len)
            args.positive_int("ngram", ngram)
        self.model, self.max_running, self.prefill_chunk = model, max_running, prefill_chunk
        self.prefix_caching, self.draft, self.draft_len, self.ngram = prefix_caching, draft, draft_len, ngram
        self.width = 1 + (draft_len if draft != "none" else 0)
        self.max_seq_len = max_seq_len
        per_request = -(-(max_seq_len + self.width) // block_size)
        self.cache = model.new_paged_cache(num_blocks=num_blocks or 2 * max_running * per_request, block_size=block_size,
                                           max_batch_size=max_running, max_seq_len=max_seq_len + self.width)
        self.device = model.embed_tokens.weight.device
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.free_rows = list(range(max_running))
        self.prefill_seconds = self.decode_seconds = 0.0
        self.steps = self.accepted_drafts = 0
        self.stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "peak_blocks": 0, "peak_cache_bytes": 0, "mixed_steps": 0,
                      "preemptions": 0, "generated_tokens": 0}

    def add(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        adapter: int = -1,
        on_token: Callable[[Request, int], None] | None = None,
        rules: LogitRules = LogitRules(),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> Request:
        """Check one request (ValueError / TypeError naming the argument; nothing queued then) and queue it.

        temperature, top_p, seed, stop_tokens: as `generate`'s; seed=None draws one here when sampling (`sampler.seed_for`):
        engines on several ranks need the caller's seed (the server's EngineLoop broadcasts rank 0's requests, seeds
        included). rules: `LogitRules` (logit bias, presence / frequency penalties, min_tokens) applied to this
        request's logits before it picks. logprobs: record each new token's log-probability and this many
        alternatives (`Request.token_logprobs`); prompt_logprobs: the same for every prompt token after the first
        (`Request.prompt_logprobs`; such a request feeds its whole prompt, no prefix-cache hit). A prompt that could
        never fit the block pool is refused here."""
        prompt = check_generation_args(self.model, [prompt], max_new_tokens, temperature, top_p, self.draft, [adapter], seed=seed,
                                       stop_tokens=stop_tokens, draft_len=self.draft_len, ngram=self.ngram)[0]
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) exceed the engine's "
                             f"max_seq_len {self.max_seq_len}; shorten one of them")
        short = self.cache.shortfall(len(prompt) + max_new_tokens + self.width, max(self.prefill_chunk, self.width))
        if short is not None:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) can never fit this engine's "
                             f"KV cache: {short}; shorten the request or build the Engine with more num_blocks")
        check_rules(rules, self.model.config.vocab_size, max_new_tokens)
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None:
                args.int_in(name, value, 0, MAX_LOGPROBS)
        request = Request(prompt=list(prompt), adapter=adapter, on_token=on_token, logprobs=logprobs,
                          sampling=Sampling(temperature, top_p, seed_for(seed, temperature), rules),
                          emitter=Emitter(stop_tokens_of(self.model, stop_tokens), max_new_tokens))
        if prompt_logprobs is not None:
            request.prompt_logprobs, request.prompt_top = [None] * len(prompt), prompt_logprobs
        self.waiting.append(request)
        self.stats["prompt_tokens"] += len(prompt)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away): it leaves the batch and frees its blocks at the next step."""
        if not isinstance(request, Request):
            raise TypeError(f"cancel takes the Request that add returned, not {type(request).__name__} {request!r}")
        request.cancelled = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, req: Request, reason: str) -> None:
        req.running = False
        req.finish_reason = req.finish_reason or reason

    def _admit(self) -> list[Request]:
        """Admit waiting requests while rows are free; returns the waiting ones that were cancelled."""
        cancelled = [r for r in self.waiting if r.cancelled]
        for req in cancelled:
            self.waiting.remove(req)
            self._finish(req, "cancelled")
        for req in list(self.waiting):
            if not self.free_rows:
                break
            if self._prefilled_by_another(req):  # (asked as each one is admitted: the first of a prompt runs)
                continue
            self.waiting.remove(req)
            req.seq_id = self.free_rows.pop(0)
            reuse = self.prefix_caching and req.prompt_logprobs is None  # prompt log-probabilities need every prompt token fed
            req.fed = self.cache.add_sequence(req.seq_id, req.prompt if reuse else None, cache_key=req.adapter)
            req.history = list(req.prompt)
            self.stats["cached_prompt_tokens"] += req.fed
            self.running.append(req)
        return cancelled

    def _prefilled_by_another(self, req: Request) -> bool:
        """A request whose prompt a running request (same adapter) is prefilling now waits for it: admitted once that
        prompt is in the prefix cache, it shares its blocks (the n choices of one OpenAI request, retries, fan-out)."""
        return self.prefix_caching and req.prompt_logprobs is None and any(
            r.fed < len(r.prompt) and r.adapter == req.adapter and r.prompt == req.prompt for r in self.running)

    def _release(self, req: Request) -> None:
        self.cache.free(req.seq_id)
        self.free_rows.append(req.seq_id)
        self.running.remove(req)

    def step(self) -> list[Request]:
        """One forward over every running request; returns the requests that finished in it (cancelled ones too)."""
        finished = [r for r in self.running if r.cancelled]
        for req in finished:
            self._finish(req, "cancelled")
            self._release(req)
        finished += self._admit()
        if not self.running:
            return finished
        rows, batch = self._reserve()
        tic = time.perf_counter()
        logits = self.model(batch.input_ids, position_ids=batch.position_ids, cache=self.cache, attention_mask=batch.attention_mask,
                            seq_ids=batch.seq_ids, adapter_ids=batch.adapter_ids, logits_at=_logit_columns(rows, self.device))
        prefilling = sum(req.fed < len(req.prompt) for req, *_ in rows)
        if prefilling:
            self.prefill_seconds += time.perf_counter() - tic  # steps that carry prompt tokens
        else:
            self.decode_seconds += time.perf_counter() - tic
        self.stats["mixed_steps"] += 0 < prefilling < len(rows)  # prompt chunks and decode tokens in one call
        self.steps += 1
        self._take_turns(rows, logits)
        for req in [r for r in self.running if not r.running]:
            last = req.out[-1] if req.out else None
            self._finish(req, "error" if req.error else "stop" if last in req.emitter.stops else "length")
            self._release(req)
            finished.append(req)
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], self.cache.blocks_in_use())
        self.stats["peak_cache_bytes"] = max(self.stats["peak_cache_bytes"], self.cache.bytes_in_use())
        return finished

    def _reserve(self) -> tuple[list[StepRow], StepBatch]:
        """This step's rows and model inputs, with their cache blocks reserved; when the pool runs out, the latest
        admitted request is preempted (it starts over from its prompt and output so far) until the rest fit."""
        while True:
            rows: list[StepRow] = []  # (request, first position, tokens, drafts)
            for req in self.running:
                if req.fed < len(req.prompt):
                    rows.append((req, req.fed, req.prompt[req.fed : req.fed + self.prefill_chunk], []))
                else:
                    drafting = self.draft != "none" and req.sampling.rules.plain  # changed logits are picked one at a time
                    drafts = lookup_draft(req.history, self.ngram, self.draft_len) if drafting else []
                    rows.append((req, len(req.history) - 1, [req.history[-1], *drafts], drafts))
            batch = _batch(rows, self.device)
            try:
                self.cache.reserve(batch.seq_ids, batch.position_ids, batch.attention_mask)  # changes nothing if it raises
                return rows, batch
            except PoolExhausted as err:
                if len(self.running) == 1:
                    raise PoolExhausted(f"{err} (a single request does not fit: pass a larger num_blocks)") from err
                victim = self.running[-1]
                self._release(victim)
                victim.prompt, victim.fed = list(victim.history), 0
                self.waiting.insert(0, victim)
                self.stats["preemptions"] += 1

    def _take_turns(self, rows: list[StepRow], logits: torch.Tensor) -> None:
        """Sample and emit each row's tokens: a prompt chunk only once the prompt is complete (its first token), a
        decode row its newest token's and its drafts'. A finished chunk enters the prefix cache unless its row failed."""
        turns: list[Turn | None] = []
        chunks = [req.fed < len(req.prompt) for req, *_ in rows]
        for req, _, fed, drafts in rows:
            if req.fed < len(req.prompt):  # a prefill chunk: the next token only after the prompt's last
                req.fed += len(fed)
                turns.append(Turn(req, 1 if req.fed == len(req.prompt) else 0, [], req.sampling, req.emitter))
            else:
                turns.append(Turn(req, len(fed), drafts, req.sampling, req.emitter))
        emitted, accepted = take_turns(logits, turns)
        self.accepted_drafts += accepted
        for b, ((req, first, fed, _), chunk) in enumerate(zip(rows, chunks)):
            if chunk and req.prompt_logprobs is not None:
                _record_prompt_logprobs(req, first, len(fed), logits[b])
        for (req, *_), chunk, tokens in zip(rows, chunks, emitted):
            if chunk and req.error is None and self.prefix_caching:  # a failed row's blocks never enter the prefix cache
                self.cache.commit(req.seq_id, req.prompt[: req.fed])  # before window layers release the chunk's blocks
            self.stats["generated_tokens"] += len(tokens)
            if req.on_token is not None:
                for token in tokens:
                    req.on_token(req, token)


@torch.no_grad()
def serve(
    model: DecoderLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    max_running: int = 8,
    prefill_chunk: int = 64,
    block_size: int = 16,
    num_blocks: int | None = None,
    prefix_caching: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] | None = None,
    draft: str = "none",
    draft_len: int = 4,
    ngram: int = 2,
    adapter_ids: Sequence[int] | None = None,
    on_step: Callable[[PagedKVCacheManager], None] | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> Generation:
    """Continue every prompt through an `Engine` (see the module docstring); `Generation.tokens[i]` belongs to prompts[i].

    max_running, prefill_chunk, block_size, num_blocks, prefix_caching, draft, draft_len and ngram: the Engine's;
    temperature, top_p, seed and stop_tokens as in `generate` (prompt i samples with seed + i, as there);
    adapter_ids: one LoRA adapter per prompt (-1: none; prefixes are cached per adapter); on_step(cache) after every
    forward; on_tokens(1) for every token. `Generation.prefill_seconds` / `decode_seconds`: model time of the steps
    with / without prompt tokens; `extra`: total_seconds, prompt_tokens, cached_prompt_tokens, peak_blocks,
    peak_cache_bytes, mixed_steps (prompt chunks and decode tokens in one call), preemptions.
    """
    prompts = check_generation_args(model, prompts, max_new_tokens, temperature, top_p, draft, adapter_ids, seed=seed,
                                    stop_tokens=stop_tokens, draft_len=draft_len, ngram=ngram)
    if draft == "model":
        raise ValueError("serve drafts with draft='prompt_lookup'; draft='model' is available in generate")
    engine = Engine(model, max_seq_len=max(len(p) for p in prompts) + max_new_tokens, max_running=max_running, prefill_chunk=prefill_chunk, block_size=block_size,
                    num_blocks=num_blocks, prefix_caching=prefix_caching, draft=draft, draft_len=draft_len, ngram=ngram)
    count = (lambda req, token: on_tokens(1)) if on_tokens is not None else None  # noqa: E731
    samplings = row_samplings(len(prompts), temperature, top_p, seed)  # the seeds generate gives its rows
    requests = [engine.add(p, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=sampling.seed, stop_tokens=stop_tokens,
                           adapter=-1 if adapter_ids is None else int(adapter_ids[i]), on_token=count)
                for i, (p, sampling) in enumerate(zip(prompts, samplings))]
    start = time.perf_counter()
    while engine.has_work():
        engine.step()
        if on_step is not None:
            on_step(engine.cache)
    result = Generation([r.out for r in requests], engine.prefill_seconds, engine.decode_seconds, engine.steps, engine.accepted_drafts)
    result.extra = {k: v for k, v in engine.stats.items() if k != "generated_tokens"}
    result.extra["total_seconds"] = time.perf_counter() - start
    result.errors = {i: req.error for i, req in enumerate(requests) if req.error is not None}
    return result


def _logit_columns(rows: list[StepRow], device: torch.device) -> torch.Tensor:
    """`[rows, K]` columns whose logits a step reads: a prompt chunk's last token (only that one is
    sampled, once the prompt is complete), then, for a request that wants prompt log-probabilities, the
    chunk's other tokens in order; every fed token of a decode or speculation row."""
    need = [([len(fed) - 1] + (list(range(len(fed) - 1)) if req.prompt_logprobs is not None else []))
            if req.fed < len(req.prompt) else list(range(len(fed))) for req, _, fed, _ in rows]
    width = max(len(n) for n in need)
    return torch.tensor([n + n[-1:] * (width - len(n)) for n in need], device=device)


def _record_prompt_logprobs(req: Request, first: int, count: int, logits: torch.Tensor) -> None:
    """Prompt log-probabilities from a chunk of `count` prompt tokens fed from position `first`: logits `[K, vocab]`
    in `_logit_columns`' order (the chunk's last token, then its others), token i + 1 scored by position i's."""
    assert req.prompt_logprobs is not None  # asked for
    order = [first + count - 1, *range(first, first + count - 1)]  # the position each column's logits follow
    scored = [(column, position) for column, position in enumerate(order) if position + 1 < len(req.prompt_logprobs)]
    if not scored:
        return
    columns = torch.tensor([c for c, _ in scored], device=logits.device)
    targets = torch.tensor([req.history[p + 1] for _, p in scored], device=logits.device)
    for (_, position), value in zip(scored, token_logprobs(logits[columns], targets, req.prompt_top)):
        req.prompt_logprobs[position + 1] = value


def check_rules(rules: LogitRules, vocab: int, max_new_tokens: int) -> None:
    """ValueError / TypeError naming the first bad field of a request's logit rules (OpenAI's bounds)."""
    if not isinstance(rules, LogitRules):
        raise TypeError(f"rules must be a distattn.runtime.sampler.LogitRules, not {type(rules).__name__}")
    for token, value in rules.bias:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ValueError(f"logit_bias: token {token!r} is not a token id of this model's vocabulary [0, {vocab})")
        args.real(f"logit_bias[{token}]", value, low=-100.0, high=100.0)
    args.real("presence_penalty", rules.presence_penalty, low=-2.0, high=2.0)
    args.real("frequency_penalty", rules.frequency_penalty, low=-2.0, high=2.0)
    args.int_in("min_tokens", rules.min_tokens, 0, max_new_tokens)


@dataclass(frozen=True)
class StepBatch:
    """The model's inputs for every row of a step, right-padded."""

    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor  # [rows, width] bool
    seq_ids: torch.Tensor  # [rows] cache rows
    adapter_ids: torch.Tensor | None  # [rows], None when no row has an adapter


def _batch(rows: list[StepRow], device: torch.device) -> StepBatch:
    ids, positions, valid = pad_rows([(first, fed) for _, first, fed, _ in rows], device)
    seq_ids = torch.tensor([req.seq_id for req, _, _, _ in rows], device=device)
    adapters = torch.tensor([req.adapter for req, _, _, _ in rows], device=device)
    return StepBatch(ids, positions, valid, seq_ids, adapters if bool((adapters >= 0).any()) else None)
