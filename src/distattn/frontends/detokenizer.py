"""Text of a growing token list, released only where it is final."""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """Text of a growing token list, released only where it is final: never half a character, never the
    start of a stop string that may still complete (so streamed pieces concatenate to the whole)."""

    def __init__(self, tokenizer: Any, skip: set[int], stops: list[str]) -> None:
        self.tokenizer, self.skip, self.stops = tokenizer, skip, stops
        self.tokens: list[int] = []
        self.sent = 0  # characters released
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The newly final text after `token` (sets `stopped` when a stop string appears)."""
        if token not in self.skip:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens) if self.tokenizer is not None else ""
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.text, self.stopped = text[:at], True
                return self._release(len(self.text))
        self.text = text
        hold = max((len(s) - 1 for s in self.stops), default=0)
        end = len(text) - hold
        while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete character: wait for its next bytes
            end -= 1
        return self._release(end)

    def finish(self) -> str:
        """Whatever is still held back, at the end."""
        return self._release(len(self.text.rstrip("\ufffd")))

    def _release(self, end: int) -> str:
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece
