"""Choosing next tokens: greedy, or a temperature / top-p sample whose noise is a pure function of
(the row's seed, the index of the token drawn, the vocabulary entry), and the stop tokens of a model.

A sample is the exponential race argmax(p / E), E ~ Exponential(1) per vocabulary entry: entry v
wins with probability p_v. E comes from a counter-based hash (splitmix64's finalizer over the
seed, the token's index in its sequence and v), not from a generator's state, so

- one row's draws never depend on which other rows share its batch, or on how the steps were
  split into calls: the host loop, the device loop and the serving Engine draw the same tokens;
- a step that samples is plain tensor work with no generator state to advance: it can be
  compiled and captured as a CUDA graph like a greedy one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_MIX_1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's multipliers, as signed int64
_MIX_2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # the increment between splitmix64's states
_INDEX_MIX = 0xD6E8FEB86659FD93 - (1 << 64)  # an odd constant spreading the token index


def seed_of(seed: int) -> int:
    """Any Python int as the signed 64-bit seed the hash takes (taken modulo 2**64)."""
    folded = seed & ((1 << 64) - 1)
    return folded - (1 << 64) if folded >= 1 << 63 else folded


@dataclass(frozen=True)
class LogitRules:
    """What a row changes in its logits before it picks (OpenAI's `logit_bias`, `presence_penalty`,
    `frequency_penalty`; vLLM's `min_tokens`). The penalties count the row's own new tokens:
    logit[v] -= frequency_penalty * count[v] + presence_penalty * (count[v] > 0), as OpenAI defines them."""

    bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # the row's stop tokens cannot be picked before it made this many tokens

    @property
    def plain(self) -> bool:
        """Nothing changes (the step's batched argmax / sample apply as they are)."""
        return not self.bias and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0 and self.min_tokens == 0

    def apply(self, logits: torch.Tensor, produced: Sequence[int], stops: set[int]) -> torch.Tensor:
        """Logits `[vocab]` (float32 or wider) of a row that has made `produced`, as the rules change them."""
        out = logits.float().clone()
        vocab, device = out.shape[-1], out.device
        if self.bias:
            tokens, values = zip(*self.bias)
            out.index_add_(0, torch.tensor(tokens, device=device), torch.tensor(values, device=device))
        if produced and (self.presence_penalty or self.frequency_penalty):
            counts = torch.bincount(torch.tensor(list(produced), device=device), minlength=vocab)[:vocab].float()
            out -= self.frequency_penalty * counts + self.presence_penalty * (counts > 0).float()
        if len(produced) < self.min_tokens and stops:
            out[torch.tensor(sorted(stops), device=device)] = float("-inf")
        return out


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens: temperature 0 is greedy; otherwise a top-p sample drawn with `seed`
    (any int; see the module docstring); `rules` change its logits first."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    rules: LogitRules = LogitRules()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log_softmax of its raw logits) and the `top` most likely
    tokens with theirs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """For logits `[N, vocab]` and the tokens `[N]` that followed them: each token's log-probability and the `top`
    most likely alternatives (fp32 log_softmax of the raw logits; one host read)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    best = logp.topk(top, dim=-1) if top else None
    rows = chosen.tolist()
    alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else [([], [])] * len(rows)
    return [TokenLogprob(int(t), lp, tuple(zip(ids, values))) for t, lp, (ids, values) in zip(tokens.tolist(), rows, alternatives)]


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 values (multiplication wraps modulo 2**64)."""
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    return x ^ _shift_right(x, 31)


def exponential_noise(seeds: torch.Tensor, indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exponential(1) noise `[N, vocab]` float64 for rows with seeds `[N]` drawing the token at `indices` `[N]`
    (its index in the row's sequence): a function of (seed, index, vocabulary entry) only."""
    entry = torch.arange(vocab, dtype=torch.long, device=seeds.device)
    row = _mix(_mix(seeds.long() * _GOLDEN) ^ (indices.long() * _INDEX_MIX))  # [N]: one stream per (seed, index)
    bits = _mix(row.unsqueeze(1) + (entry + 1) * _GOLDEN)  # [N, vocab]
    uniform = (_shift_right(bits, 11).double() + 0.5) * 2.0 ** -53  # in (0, 1), never 0 or 1
    return -torch.log(uniform)


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """fp64 sampling probabilities `[N, vocab]` of logits `[N, vocab]`: softmax(logits / temperature), zero outside
    the top-p nucleus (the smallest set of most likely tokens whose mass reaches top_p). temperature `[N]` > 0,
    top_p `[N]` in (0, 1], or None: every row's is 1 (no sort)."""
    probs = torch.softmax(logits.double() / temperature.double().unsqueeze(1), dim=-1)
    if top_p is None:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p.double().unsqueeze(1)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None, seeds: torch.Tensor, indices: torch.Tensor,
           *, any_sampled: bool = True) -> torch.Tensor:
    """Next tokens `[N]` from logits `[N, vocab]` with no host sync: the argmax where temperature `[N]` is 0, else the
    exponential race over `probabilities` with `exponential_noise(seeds, indices)` (all `[N]`). What the caller knows
    of every row (not data: no branch on a tensor): any_sampled=False, every row is greedy (no sampling work);
    top_p=None, every row's top_p is 1 (no sort)."""
    greedy = logits.argmax(-1)
    if not any_sampled:
        return greedy
    sampled = temperature > 0
    safe = torch.where(sampled, temperature, torch.ones_like(temperature))  # greedy rows: any positive number
    probs = probabilities(logits, safe, top_p)
    raced = (probs / exponential_noise(seeds, indices, logits.shape[-1])).argmax(-1)
    return torch.where(sampled, raced, greedy)


def fresh_seed() -> int:
    """A seed for a call or request that gave none: drawn from torch's default generator (`torch.manual_seed` fixes it)."""
    return int(torch.randint(0, 1 << 62, ()).item())


def seed_for(seed: int | None, temperature: float) -> int:
    """The seed a request samples with: its own, else a fresh one; a greedy request draws nothing (its seed is unused,
    and torch's generator is left as it was)."""
    if seed is not None:
        return seed
    return fresh_seed() if temperature > 0 else 0


@dataclass(frozen=True)
class SamplingRows:
    """Per-row sampling parameters as tensors `[N]` on the logits' device: what a decode step samples with."""

    temperature: torch.Tensor  # [N] float: 0 greedy
    top_p: torch.Tensor | None  # [N] float, or None: every row's is 1
    seeds: torch.Tensor  # [N] long
    any_sampled: bool  # some row samples (else the step only takes argmaxes)

    @classmethod
    def of(cls, rows: Sequence[Sampling], device: torch.device) -> SamplingRows:
        """The tensors of `rows` (one `Sampling` each)."""
        nucleus = any(r.top_p < 1.0 for r in rows)
        return cls(torch.tensor([r.temperature for r in rows], device=device),
                   torch.tensor([r.top_p for r in rows], device=device) if nucleus else None,
                   torch.tensor([seed_of(r.seed) for r in rows], dtype=torch.long, device=device), not all(r.greedy for r in rows))

    def sample(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Next tokens `[N]` from logits `[N, vocab]`, row n's drawn as the token at indices[n] of its sequence."""
        return sample(logits, self.temperature, self.top_p, self.seeds, indices, any_sampled=self.any_sampled)


def pick(logits: torch.Tensor, sampling: Sampling, index: int) -> torch.Tensor:
    """Next tokens `[N]` of one row from logits `[N, vocab]`, the i-th drawn as the token at `index + i` of the row's
    sequence (`sample` with the row's parameters)."""
    if sampling.greedy:
        return logits.argmax(-1)
    n, device = logits.shape[0], logits.device
    return SamplingRows.of([sampling] * n, device).sample(logits, torch.arange(index, index + n, device=device))


def stop_tokens_of(model: Any, stop_tokens: Sequence[int] | None) -> set[int]:
    """The tokens that end a row: `stop_tokens` when given, else the checkpoint's end tokens as HF
    generate reads them (generation_config.json's eos_token_id, where instruct models keep their
    end-of-turn token, else config.json's)."""
    if stop_tokens is not None:
        return set(stop_tokens)
    generation = model.generation_config
    eos = generation.eos_token_id if generation is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)  # an optional field of HF configs
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
