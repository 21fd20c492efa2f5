"""Choosing next tokens: greedy or temperature / top-p sampling on the logits' device, and the stop tokens of a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens: temperature 0 is greedy; otherwise a top-p sample from `generator`."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def pick(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next tokens `[N]` from logits `[N, vocab]`: argmax, or a temperature / top-p sample (fp64 probabilities)."""
    if sampling.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, sampling), 1, generator=sampling.generator).squeeze(-1)


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """fp64 sampling probabilities `[N, vocab]`: softmax(logits / temperature), zero outside the top-p nucleus."""
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return probs


def sample_on_device(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next tokens `[B]` from logits `[B, vocab]` with no host sync: a temperature / top-p sample drawn as
    argmax(p / E), E ~ Exponential(1) per token (the exponential race: token v wins with probability p_v),
    one draw of noise `[B, vocab]` per call from `sampling.generator`. Greedy: the argmax."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, sampling)
    noise = torch.empty_like(probs).exponential_(1.0, generator=sampling.generator)
    return (probs / noise).argmax(-1)


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
