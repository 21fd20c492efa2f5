"""One decode step's host side, shared by `generate` and the `Engine`: rows, their emitter, and `take_turns`.

A step's forward gives logits `[R, K, vocab]`; each row that samples in this step has a `Turn`:
how many of its logit columns it reads (its newest token plus drafts), its drafts and its
sampling. `take_turns` reads the whole step's finite flags and greedy picks back to the host
once, stops a row whose own logits went non-finite, and emits every row's accepted tokens (a row's
`LogitRules` change its logits first; a row that asks for them gets its tokens' log-probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .sampler import Sampling, TokenLogprob, pick, token_logprobs


@dataclass
class Row:
    """One sequence being continued: its tokens so far (prompt and output), its output, whether it runs."""

    history: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    running: bool = True
    error: str | None = None  # set when the row stopped because its logits went non-finite
    logprobs: int | None = None  # report each new token's log-probability and this many alternatives (None: none)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token of `out`, when logprobs is set


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


@dataclass(frozen=True)
class Turn:
    """One row's part of a step: `columns` logits it reads (0: it only checks column 0, a prompt chunk
    before the prompt's end), the drafts it fed after its newest token, how it samples, who emits."""

    row: Row
    columns: int
    drafts: Sequence[int]
    sampling: Sampling
    emitter: Emitter


def take_turns(logits: torch.Tensor, turns: Sequence[Turn | None]) -> tuple[list[list[int]], int]:
    """Check, sample and emit every row of a step: logits `[R, K, vocab]`, turns[r] for row r (None: skip).

    Returns (the tokens each turn emitted, draft tokens accepted). The host reads the step's finite flags
    and its greedy picks once each; a sampled row draws its token at index len(history) (`sampler.pick`).
    """
    finite = torch.isfinite(logits).all(-1).tolist()  # [R][K]: once per step
    greedy = logits.argmax(-1).tolist() if any(t is not None and t.columns and t.sampling.greedy for t in turns) else None
    emitted: list[list[int]] = []
    accepted = 0
    for b, turn in enumerate(turns):
        if turn is None:
            emitted.append([])
            continue
        row, before = turn.row, len(turn.row.out)
        if not turn.emitter.fail_if_non_finite(row, finite[b][: max(turn.columns, 1)]) and turn.columns:
            if not turn.sampling.rules.plain:  # one column: rows whose logits change are never drafted for
                changed = turn.sampling.rules.apply(logits[b, 0], row.out, turn.emitter.stops)
                picks = pick(changed.unsqueeze(0), turn.sampling, len(row.history)).tolist()
            elif greedy is not None and turn.sampling.greedy:
                picks = greedy[b][: turn.columns]
            else:
                picks = pick(logits[b, : turn.columns], turn.sampling, len(row.history)).tolist()
            accepted += turn.emitter.accept(row, picks, list(turn.drafts))
            if row.logprobs is not None and len(row.out) > before:
                made = torch.tensor(row.out[before:], device=logits.device)
                row.token_logprobs += token_logprobs(logits[b, : len(made)], made, row.logprobs)
        emitted.append(row.out[before:])
    return emitted, accepted
