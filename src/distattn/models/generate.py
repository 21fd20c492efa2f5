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
from .batch import pad_rows
from .decoder import DecoderLM
from .drafting import ModelDrafter, lookup_draft


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens of each prompt
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # forward calls after prefill
    accepted_drafts: int = 0  # draft tokens accepted (speculation)
    extra: dict = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # prompt index -> why that row stopped early (its own logits went non-finite)


def _stop_set(model: DecoderLM, stop_tokens: Sequence[int] | None) -> set[int]:
    """The tokens that end a row: `stop_tokens` when given, else the checkpoint's end tokens as HF
    generate reads them (generation_config.json's eos_token_id, where instruct models keep their
    end-of-turn token, else config.json's)."""
    if stop_tokens is not None:
        return set(stop_tokens)
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens `[B]` from logits `[B, vocab]`: argmax, or a temperature / top-p sample."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
        n_adapters = len(model.layers[0].self_attn.adapter_names) if model.layers else 0
        for i, a in enumerate(adapter_ids):
            if isinstance(a, bool) or not isinstance(a, int) or not -1 <= a < n_adapters:
                raise ValueError(f"adapter_ids[{i}]={a!r} must be -1 (no adapter) or the index of one of the {n_adapters} loaded adapters")
    return prompts


@dataclass
class Row:
    """One sequence being continued: its tokens so far (prompt and output), its output, whether it runs."""

    history: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    running: bool = True
    error: str | None = None  # set when the row stopped because its logits went non-finite


@dataclass(frozen=True)
class Emitter:
    """Appends produced tokens to rows; a row stops at a stop token (kept) or after max_new_tokens.

    on_tokens(1) is called for every token (progress bars).
    """

    stops: set[int]
    max_new_tokens: int
    on_tokens: Callable[[int], None] | None = None

    def emit(self, row: Row, token: int) -> None:
        if self.on_tokens is not None:
            self.on_tokens(1)
        row.out.append(token)
        row.history.append(token)
        if token in self.stops or len(row.out) >= self.max_new_tokens:
            row.running = False

    def fail_if_non_finite(self, row: Row, finite: list[bool]) -> bool:
        """Stop `row` (reported in `Generation.errors`, its tokens so far kept) when the logits it would
        sample from are not all finite: a NaN or Inf of its own; other rows are untouched. True if stopped."""
        if all(finite):
            return False
        row.running = False
        row.error = f"logits went non-finite at new token {len(row.out) + finite.index(False)}: the model's numbers overflowed for this input"
        return True

    def accept(self, row: Row, picks: list[int], draft: list[int]) -> int:
        """Emit the model's picks for a row fed [newest, *draft]: picks[i] follows the i-th fed token.

        Draft token i stands while it equals picks[i]; emitting stops after the first
        disagreement (the model's own token is kept) or when the row stops. Returns the
        number of draft tokens accepted.
        """
        accepted = 0
        for i, token in enumerate(picks):
            self.emit(row, token)
            if not row.running or i == len(draft) or draft[i] != token:
                break
            accepted += 1
        return accepted


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
) -> Generation:
    """Continue every prompt; see the module docstring.

    temperature 0 is greedy; otherwise sample with `top_p` and `seed`. A row stops at a
    stop token (kept) or after max_new_tokens; stop_tokens=None means the checkpoint's
    end tokens as HF generate reads them (generation_config.json, else config.json). draft: "none", "prompt_lookup" (n-gram lookup in the
    prompt and output) or "model" (greedy drafts of `draft_model`, a smaller model with
    the same vocabulary); speculation verifies greedily, so it needs temperature 0.
    on_tokens(n) is called with the number of tokens each step produced (progress bars).
    adapter_ids: one LoRA adapter per prompt (index into the model's loaded adapters, -1: none).
    """
    prompts = check_generation_args(model, prompts, max_new_tokens, temperature, top_p, draft, adapter_ids, seed=seed,
                                    stop_tokens=stop_tokens, draft_len=draft_len, ngram=ngram)
    if (draft == "model") != (draft_model is not None):
        raise ValueError("draft='model' needs draft_model=<a DecoderLM>, and draft_model needs draft='model'")
    if draft_model is not None and draft_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft_model has vocab_size {draft_model.config.vocab_size}, the model {model.config.vocab_size}; they must share a tokenizer")
    device = model.embed_tokens.weight.device
    adapters = None if adapter_ids is None else torch.tensor(list(adapter_ids), dtype=torch.long, device=device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    width = 1 + (draft_len if draft != "none" else 0)
    batch, longest = len(prompts), max(len(p) for p in prompts)
    cache = model.new_cache(batch, longest + max_new_tokens + width, speculation_width=width)
    drafter = None if draft_model is None else ModelDrafter(draft_model, batch, longest + max_new_tokens + width, width)
    emitter = Emitter(_stop_set(model, stop_tokens), max_new_tokens, on_tokens)
    rows = [Row(list(p)) for p in prompts]
    result = Generation([row.out for row in rows])

    start = time.perf_counter()
    ids, positions, valid = pad_rows([(0, p) for p in prompts], device)
    last = torch.tensor([[len(p) - 1] for p in prompts], device=device)  # logits of each row's last prompt token only
    logits = model(ids, position_ids=positions, cache=cache, attention_mask=valid, adapter_ids=adapters, logits_at=last)
    finite = torch.isfinite(logits[:, 0]).all(-1).tolist()
    pending = _pick(torch.nan_to_num(logits[:, 0]), temperature, top_p, generator).tolist()
    result.prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    for row, token, ok in zip(rows, pending, finite):
        if not emitter.fail_if_non_finite(row, [ok]):
            emitter.emit(row, token)
    while any(row.running for row in rows):
        history, active = [row.history for row in rows], [row.running for row in rows]
        if drafter is not None:
            drafts = drafter.propose(history, active, draft_len)
        else:
            drafts = [lookup_draft(h, ngram, draft_len) if running and draft != "none" else [] for h, running in zip(history, active)]
        feed, positions, valid = pad_rows([(len(h) - 1, [h[-1], *d] if running else []) for h, d, running in zip(history, drafts, active)], device)
        logits = model(feed, position_ids=positions, cache=cache, attention_mask=valid, adapter_ids=adapters)
        result.decode_steps += 1
        finite = torch.isfinite(logits).all(-1).tolist()  # [B][S]: once per step
        for b, row in enumerate(rows):
            if row.running and not emitter.fail_if_non_finite(row, finite[b][: 1 + len(drafts[b])]):
                picks = _pick(logits[b, : 1 + len(drafts[b])], temperature, top_p, generator).tolist()
                result.accepted_drafts += emitter.accept(row, picks, drafts[b])
    result.decode_seconds = time.perf_counter() - start
    result.errors = {i: row.error for i, row in enumerate(rows) if row.error is not None}
    return result


def generate_greedy(model: DecoderLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_tokens: Sequence[int] | None = None) -> list[list[int]]:
    """The new tokens of plain greedy decoding (see `generate`)."""
    return generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens).tokens
