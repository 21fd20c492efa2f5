"""Draft tokens for speculative decoding: from the prompt (n-gram lookup) or from a smaller model.

A drafter proposes up to `k` tokens per row; the target model verifies them in one
multi-token step and keeps the longest prefix it agrees with (`generate.accept`), so
the output equals plain greedy decoding whatever the drafts are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import pad_rows
from ..models.decoder import DecoderLM


def lookup_draft(history: list[int], ngram: int, length: int) -> list[int]:
    """Tokens that followed the latest earlier occurrence of the last `ngram` tokens."""
    if len(history) <= ngram:
        return []
    tail = history[-ngram:]
    for start in range(len(history) - ngram - 1, -1, -1):
        if history[start : start + ngram] == tail:
            return history[start + ngram : start + ngram + length]
    return []


class ModelDrafter:
    """Greedy drafts from a draft model with its own KV cache.

    The cache remembers which tokens it holds per row; each call first feeds the row's
    history from the first position where that differs from what the target accepted
    (prompt, accepted tokens; rejected drafts are overwritten), then `k - 1` single
    steps. Rows of different lengths share one padded call per step.
    """

    def __init__(self, model: DecoderLM, batch: int, max_seq_len: int, width: int) -> None:
        self.model = model
        self.cache = model.new_cache(batch, max_seq_len, speculation_width=width)
        self.fed: list[list[int]] = [[] for _ in range(batch)]  # the tokens at positions 0.. of each cache row
        self.device = model.embed_tokens.weight.device

    def propose(self, history: Sequence[list[int]], active: Sequence[bool], k: int) -> list[list[int]]:
        """Up to k draft tokens for each active row (none for the others)."""
        rows = [b for b in range(len(history)) if active[b]]
        drafts: list[list[int]] = [[] for _ in history]
        if not rows or k < 1:
            return drafts
        feeds = {}
        for b in rows:
            same = 0
            for held, token in zip(self.fed[b], history[b]):
                if held != token:
                    break
                same += 1
            same = min(same, len(history[b]) - 1)  # always feed the newest token: its logits give the first draft
            feeds[b] = (same, history[b][same:])
            self.fed[b] = history[b][:same]
        for _ in range(k):  # each pick is fed next, to draw the one after it
            picks = self._step(feeds)
            feeds = {}
            for b, token in picks.items():
                drafts[b].append(token)
                feeds[b] = (len(self.fed[b]), [token])
        return drafts

    def _step(self, feeds: dict[int, tuple[int, list[int]]]) -> dict[int, int]:
        """Feed rows {b: (first position, tokens)} in one call; the greedy next token of each."""
        rows = [feeds.get(b, (len(self.fed[b]), [])) for b in range(len(self.fed))]  # rows not fed: padding, stores nothing
        ids, positions, valid = pad_rows(rows, self.device)
        last = torch.tensor([[max(len(tokens), 1) - 1] for _, tokens in rows], device=self.device)  # only each row's newest token is read
        logits = self.model(ids, position_ids=positions, cache=self.cache, attention_mask=valid, logits_at=last)
        picks = logits[:, 0].argmax(-1).tolist()
        for b, (_, tokens) in feeds.items():
            self.fed[b].extend(tokens)
        return {b: picks[b] for b in feeds}
