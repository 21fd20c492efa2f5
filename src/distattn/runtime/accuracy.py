"""How far a quantized model (weights or KV cache) is from its full-precision twin, as users meet it.

Both models decode the reference model's own greedy continuation one token per step, through
their KV caches (so a quantized cache is read at every step, and int8 / int4 weights run their
decode kernels): the logits they give for each next token are compared. The candidate's own
free-running greedy tokens tell where it first leaves the reference's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.decoder import DecoderLM
from .generate import generate


@dataclass(frozen=True)
class Agreement:
    """One candidate against its reference over `steps` greedy steps of one prompt."""

    steps: int
    max_error: float  # max over steps of max |logit error| / that step's logit spread (max - min of the reference)
    mean_error: float  # mean over steps of mean |logit error| / spread
    top1: float  # fraction of steps whose top token is the reference's
    first_divergence: int | None  # first step where the candidate's own greedy token differs (None: never)


@torch.no_grad()
def decode_logits(model: DecoderLM, prompt: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
    """Logits `[len(continuation), vocab]` (fp64): row i predicts continuation[i], after a prefill of
    `prompt` and decode steps feeding continuation[:i] one token at a time."""
    device = model.embed_tokens.weight.device
    cache = model.new_cache(1, len(prompt) + len(continuation))
    ids = torch.tensor([list(prompt)], device=device)
    rows = [model(ids, position_ids=torch.arange(len(prompt), device=device).view(1, -1), cache=cache,
                  logits_at=torch.tensor([[len(prompt) - 1]], device=device))[0, 0]]
    for i, token in enumerate(continuation[:-1]):
        pos = torch.tensor([[len(prompt) + i]], device=device)
        rows.append(model(torch.tensor([[token]], device=device), position_ids=pos, cache=cache)[0, 0])
    return torch.stack(rows).double()


def agreement(reference: DecoderLM, candidate: DecoderLM, prompt: Sequence[int], steps: int,
              reference_path: Sequence[int] | None = None, reference_logits: torch.Tensor | None = None) -> Agreement:
    """Compare `candidate` with `reference` over `steps` greedy steps after `prompt` (see the module doc).

    reference_path / reference_logits: the reference's greedy tokens and `decode_logits` along them,
    when the caller has them already (one reference, several candidates).
    """
    path = list(reference_path) if reference_path is not None else generate(reference, [prompt], max_new_tokens=steps, stop_tokens=[]).tokens[0]
    want = decode_logits(reference, prompt, path) if reference_logits is None else reference_logits
    got = decode_logits(candidate, prompt, path)
    spread = (want.amax(-1) - want.amin(-1)).unsqueeze(-1)  # [steps, 1]
    error = (got - want).abs() / spread
    own = generate(candidate, [prompt], max_new_tokens=steps, stop_tokens=[]).tokens[0]
    differ = [i for i, (a, b) in enumerate(zip(own, path)) if a != b]
    return Agreement(
        steps=len(path),
        max_error=float(error.max()),
        mean_error=float(error.mean()),
        top1=float((got.argmax(-1) == want.argmax(-1)).double().mean()),
        first_divergence=differ[0] if differ else None,
    )
