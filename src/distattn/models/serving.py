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
from ..paged import PagedKVCacheManager, PoolExhausted
from .decoder import DecoderLM
from .batch import pad_rows
from .drafting import lookup_draft
from .generate import Emitter, Generation, Row, _pick, _stop_set, check_generation_args


@dataclass
class _Request(Row):
    prompt: list[int] = field(default_factory=list)
    adapter: int = -1  # LoRA adapter (-1: none)
    seq_id: int = -1  # cache row while running
    fed: int = 0  # prompt tokens in the cache


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
    """Continue every prompt (see the module docstring); `Generation.tokens[i]` belongs to prompts[i].

    Args:
        max_running: requests in the batch at once (cache rows).
        prefill_chunk: prompt tokens a request feeds per step.
        block_size: token positions per block of the paged cache.
        num_blocks: blocks of the paged cache; the default leaves room
            for max_running full-length requests twice over (the rest caches prefixes).
        prefix_caching: look prompts up in the prefix cache and commit them to it.
        adapter_ids: one LoRA adapter per prompt (-1: none); prefixes are cached per adapter.
        on_step: called with the cache after every forward (accounting, tests).
        on_tokens: called with 1 for every token produced (progress bars).
        temperature: as in `generate` (also top_p, seed, stop_tokens, draft, draft_len, ngram).

    `Generation.prefill_seconds` is the model time of the steps carrying prompt tokens,
    `decode_seconds` that of the other steps, `decode_steps` the forward calls. `Generation.extra` reports
    `total_seconds`, `prompt_tokens`, `cached_prompt_tokens` (prefix hits),
    `peak_blocks`, `peak_cache_bytes`, `mixed_steps` (calls carrying prompt chunks and decode tokens) and
    `preemptions`.
    """
    prompts = check_generation_args(model, prompts, max_new_tokens, temperature, top_p, draft, adapter_ids, seed=seed,
                                    stop_tokens=stop_tokens, draft_len=draft_len, ngram=ngram)
    if draft == "model":
        raise ValueError("serve drafts with draft='prompt_lookup'; draft='model' is available in generate")
    for name, value in (("max_running", max_running), ("prefill_chunk", prefill_chunk), ("block_size", block_size)):
        args.positive_int(name, value)
    if num_blocks is not None:
        args.positive_int("num_blocks", num_blocks)
    args.flag("prefix_caching", prefix_caching)
    device = model.embed_tokens.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    width = 1 + (draft_len if draft != "none" else 0)
    max_len = max(len(p) for p in prompts) + max_new_tokens + width
    per_request = -(-max_len // block_size)
    cache = model.new_paged_cache(num_blocks=num_blocks or 2 * max_running * per_request, block_size=block_size,
                                  max_batch_size=max_running, max_seq_len=max_len)
    emitter = Emitter(_stop_set(model, stop_tokens), max_new_tokens, on_tokens)
    requests = [_Request(prompt=list(p), adapter=-1 if adapter_ids is None else int(adapter_ids[i])) for i, p in enumerate(prompts)]
    waiting, running, free_rows = list(requests), [], list(range(max_running))
    result = Generation([r.out for r in requests])
    stats = {"prompt_tokens": sum(len(p) for p in prompts), "cached_prompt_tokens": 0, "peak_blocks": 0, "peak_cache_bytes": 0, "mixed_steps": 0,
             "preemptions": 0}
    start = time.perf_counter()
    while waiting or running:
        while waiting and free_rows:
            req = waiting.pop(0)
            req.seq_id = free_rows.pop(0)
            req.fed = cache.add_sequence(req.seq_id, req.prompt if prefix_caching else None, cache_key=req.adapter)
            req.history = list(req.prompt)
            stats["cached_prompt_tokens"] += req.fed
            running.append(req)
        while True:
            rows = []  # (request, first position, tokens, drafts)
            for req in running:
                if req.fed < len(req.prompt):
                    rows.append((req, req.fed, req.prompt[req.fed : req.fed + prefill_chunk], []))
                else:
                    drafts = lookup_draft(req.history, ngram, draft_len) if draft != "none" else []
                    rows.append((req, len(req.history) - 1, [req.history[-1], *drafts], drafts))
            batch = _batch(rows, device)
            try:
                cache.reserve(batch["seq_ids"], batch["position_ids"], batch["attention_mask"])  # changes nothing if it raises
                break
            except PoolExhausted as err:
                if len(running) == 1:
                    raise PoolExhausted(f"{err} (a single request does not fit: pass a larger num_blocks)") from err
                victim = running.pop()  # preempt the latest admitted: it starts over from its prompt and output so far
                cache.free(victim.seq_id)
                free_rows.insert(0, victim.seq_id)
                victim.prompt, victim.fed = list(victim.history), 0
                waiting.insert(0, victim)
                stats["preemptions"] += 1
        tic = time.perf_counter()
        logits = model(batch.pop("input_ids"), cache=cache, logits_at=_logit_columns(rows, device), **batch)
        prefilling = sum(req.fed < len(req.prompt) for req, *_ in rows)
        if prefilling:
            result.prefill_seconds += time.perf_counter() - tic  # steps that carry prompt tokens
        else:
            result.decode_seconds += time.perf_counter() - tic
        stats["mixed_steps"] += 0 < prefilling < len(rows)  # prompt chunks and decode tokens in one call
        result.decode_steps += 1
        finite = torch.isfinite(logits).all(-1).tolist()  # [rows][K]: once per step
        for b, (req, first, fed, drafts) in enumerate(rows):
            if req.fed < len(req.prompt):  # a prefill chunk: the next token only after the prompt's last
                req.fed += len(fed)
                if emitter.fail_if_non_finite(req, finite[b][:1]):
                    continue  # reported; its blocks are freed below and never enter the prefix cache
                if prefix_caching:  # now, before window layers release the chunk's blocks
                    cache.commit(req.seq_id, req.prompt[: req.fed])
                if req.fed == len(req.prompt):
                    emitter.emit(req, int(_pick(logits[b, :1], temperature, top_p, generator)[0]))
            elif not emitter.fail_if_non_finite(req, finite[b][: len(fed)]):
                picks = _pick(logits[b, : len(fed)], temperature, top_p, generator).tolist()
                result.accepted_drafts += emitter.accept(req, picks, drafts)
        for req in [r for r in running if not r.running]:
            cache.free(req.seq_id)
            free_rows.append(req.seq_id)
            running.remove(req)
        stats["peak_blocks"] = max(stats["peak_blocks"], cache.blocks_in_use())
        stats["peak_cache_bytes"] = max(stats["peak_cache_bytes"], cache.bytes_in_use())
        if on_step is not None:
            on_step(cache)
    stats["total_seconds"] = time.perf_counter() - start
    result.extra = stats
    result.errors = {i: req.error for i, req in enumerate(requests) if req.error is not None}
    return result


def _logit_columns(rows: list, device: torch.device) -> torch.Tensor:
    """`[rows, K]` columns whose logits a step reads: a prompt chunk's last token (only that one is
    sampled, once the prompt is complete), every fed token of a decode or speculation row."""
    need = [[len(fed) - 1] if req.fed < len(req.prompt) else list(range(len(fed))) for req, _, fed, _ in rows]
    width = max(len(n) for n in need)
    return torch.tensor([n + n[-1:] * (width - len(n)) for n in need], device=device)


def _batch(rows: list, device: torch.device) -> dict[str, torch.Tensor | None]:
    """The model's inputs for every row, right-padded: input_ids, position_ids, attention_mask `[rows, width]`,
    seq_ids and adapter_ids `[rows]` (None when no row has an adapter)."""
    ids, positions, valid = pad_rows([(first, fed) for _, first, fed, _ in rows], device)
    seq_ids = torch.tensor([req.seq_id for req, _, _, _ in rows], device=device)
    adapters = torch.tensor([req.adapter for req, _, _, _ in rows], device=device)
    lora = adapters if bool((adapters >= 0).any()) else None
    return {"input_ids": ids, "position_ids": positions, "attention_mask": valid, "seq_ids": seq_ids, "adapter_ids": lora}
