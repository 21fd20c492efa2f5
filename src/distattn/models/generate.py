"""Batched greedy generation over a KV cache: prompts of different lengths share one batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .decoder import DecoderLM


@torch.no_grad()
def generate_greedy(
    model: DecoderLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_tokens: Sequence[int] | None = None
) -> list[list[int]]:
    """Greedy continuation of every prompt (batch row b = cache row b).

    Prefill runs the right-padded prompts at once; each decode step feeds every row's
    last token at its own position. A row stops at a stop token (kept in its output)
    or after max_new_tokens; finished rows are fed as padding. stop_tokens=None means
    the checkpoint's eos_token_id (as HF generate); pass [] to never stop early.

    Returns the new token ids of each prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    device = model.embed_tokens.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    cache = model.new_cache(batch, longest + max_new_tokens)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    valid = torch.arange(longest, device=device).expand(batch, longest) < lengths.unsqueeze(1)
    logits = model(ids, position_ids=torch.arange(longest, device=device).expand(batch, longest), cache=cache, attention_mask=valid)
    nxt = logits[torch.arange(batch), lengths - 1].argmax(-1)  # [B]
    out: list[list[int]] = [[] for _ in range(batch)]
    active = torch.ones(batch, dtype=torch.bool, device=device)
    if stop_tokens is None:
        eos = getattr(model.config, "eos_token_id", None)
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    stops = set(stop_tokens)
    for step in range(max_new_tokens):
        for b in range(batch):
            if active[b]:
                out[b].append(int(nxt[b]))
                if int(nxt[b]) in stops or len(out[b]) == max_new_tokens:
                    active[b] = False
        if not bool(active.any()):
            break
        positions = (lengths + step).unsqueeze(1)  # [B, 1]
        logits = model(nxt.unsqueeze(1), position_ids=positions, cache=cache, attention_mask=active.unsqueeze(1))
        nxt = logits[:, -1].argmax(-1)
    return out
