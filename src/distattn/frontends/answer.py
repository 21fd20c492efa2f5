"""The answer to one OpenAI request: its `n` choices as text (stop strings held back), with log-probabilities
and usage where asked, whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..runtime.sampler import TokenLogprob
from .detokenizer import Detokenizer
from .engine_loop import EngineLoop, Stream
from .openai_request import Reply


class Choice:
    """One choice: the tokens of its stream as final text, and the log-probabilities of the tokens behind each piece."""

    def __init__(self, loop: EngineLoop, tokenizer: Any, stop_tokens: set[int], stream: Stream, index: int, reply: Reply) -> None:
        self.loop, self.tokenizer, self.stream, self.index, self.reply = loop, tokenizer, stream, index, reply
        self.detok = Detokenizer(tokenizer, stop_tokens, reply.stops)
        self.taken = 0  # tokens whose log-probabilities went out with a piece

    async def pieces(self) -> AsyncIterator[tuple[str, list[TokenLogprob]]]:
        """(newly final text, log-probabilities of the tokens since the last piece) as tokens come; then what is held back."""
        while True:
            token = await self.stream.tokens.get()
            if token is None:
                break
            piece = self.detok.add(token)
            if piece:
                yield piece, self._take()
            if self.detok.stopped:
                self.loop.cancel(self.stream)
                break
        rest = self.detok.finish() if not self.detok.stopped else ""
        yield rest, self._take()

    def _take(self) -> list[TokenLogprob]:
        request = self.stream.request
        if self.reply.logprobs is None or request is None:
            return []
        new = request.token_logprobs[self.taken :]
        self.taken += len(new)
        return new

    def finish_reason(self) -> str:
        req = self.stream.request
        if self.detok.stopped:
            return "stop"
        if req is None or req.finish_reason == "length":
            return "length"
        return "stop" if req.finish_reason == "stop" else req.finish_reason or "stop"

    def produced(self) -> list[int]:
        return list(self.stream.request.out) if self.stream.request is not None else []

    def prompt_logprobs(self) -> list[TokenLogprob | None]:
        req = self.stream.request
        return list(req.prompt_logprobs) if req is not None and req.prompt_logprobs is not None else []

    def cancel_if_running(self) -> None:
        if self.stream.request is not None and self.stream.request.running:
            self.loop.cancel(self.stream)


class Answer:
    """A request's choices, answered as one body (`whole`) or as chunks (`events`)."""

    def __init__(self, tokenizer: Any, prompt: list[int], prompt_text: str, reply: Reply, chat: bool, choices: list[Choice]) -> None:
        self.tokenizer, self.prompt, self.prompt_text, self.reply, self.chat, self.choices = tokenizer, prompt, prompt_text, reply, chat, choices
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"token_id:{token}"

    def usage(self) -> dict:
        out = sum(len(c.produced()) for c in self.choices)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": out, "total_tokens": len(self.prompt) + out}

    async def whole(self) -> dict:
        """Every choice in one body, with its token ids (a model without a tokenizer has no text)."""
        bodies = await asyncio.gather(*(self._whole_choice(c) for c in self.choices))
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.reply.model, "choices": list(bodies), "usage": self.usage()}

    async def _whole_choice(self, choice: Choice) -> dict:
        text, made = "", []
        async for piece, values in choice.pieces():
            text += piece
            made += values
        logprobs: list[TokenLogprob | None] = [*self._echoed(choice), *made]  # (the prompt's are known once its first token came)
        body: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason(), "token_ids": choice.produced(),
                                "logprobs": self._logprobs(logprobs, 0 if self.reply.echo else len(self.prompt_text))}
        text = (self.prompt_text if self.reply.echo else "") + text
        body.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return body

    def _echoed(self, choice: Choice) -> list[TokenLogprob | None]:
        """Completions with echo and logprobs: the prompt's tokens first (the first has no log-probability)."""
        if not (self.reply.echo and self.reply.logprobs is not None):
            return []
        values = choice.prompt_logprobs()
        return [values[i] if i < len(values) else None for i in range(len(self.prompt))]

    def _logprobs(self, values: Sequence[TokenLogprob | None], offset: int) -> dict | None:
        """OpenAI's logprobs object: chat's {"content": [...]}, or completions' tokens / token_logprobs / top_logprobs /
        text_offset (text_offset counted from the start of the returned text, or of the prompt without echo)."""
        if self.reply.logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(v) for v in values if v is not None]}
        tokens = [self.token_text(self.prompt[i] if v is None else v.token) for i, v in enumerate(values)]
        offsets, at = [], offset
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": [None if v is None else v.logprob for v in values],
                "top_logprobs": [None if v is None else {self.token_text(t): lp for t, lp in v.top} for v in values],
                "text_offset": offsets}

    def _chat_entry(self, value: TokenLogprob) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {**entry(value.token, value.logprob), "top_logprobs": [entry(t, lp) for t, lp in value.top]}

    def chunk(self, index: int, text: str, finish: str | None, values: Sequence[TokenLogprob | None], first: bool) -> dict:
        """One streamed chunk (OpenAI's chat.completion.chunk or text_completion) of choice `index`."""
        logprobs = self._logprobs(values, 0) if values or finish is None else None
        if self.chat:
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if finish is None or text else {}
            body = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.reply.model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
        else:
            body = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.reply.model,
                    "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}
        if self.reply.continuous_usage:
            body["usage"] = self.usage()
        return body

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: every choice's text as it becomes final (choices interleaved), each choice's finish
        reason, the usage when asked (`stream_options.include_usage`), then [DONE]."""
        chunks: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._stream_choice(c, chunks)) for c in self.choices]
        try:
            for _ in self.choices:
                while (chunk := await chunks.get()) is not None:  # one None per choice: its end
                    yield f"data: {json.dumps(chunk)}\n\n"
            if self.reply.include_usage:
                usage: dict[str, Any] = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion", "created": self.created,
                         "model": self.reply.model, "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a client that went away: its requests leave the batch and free their blocks at the next step
            for task in tasks:
                task.cancel()
            for choice in self.choices:
                choice.cancel_if_running()

    async def _stream_choice(self, choice: Choice, chunks: asyncio.Queue) -> None:
        """Choice's chunks into `chunks`, then None."""
        first = True
        if self.chat:
            chunks.put_nowait(self.chunk(choice.index, "", None, [], first=True))
            first = False
        echo = self.reply.echo  # the prompt's chunk goes out with the first piece: its log-probabilities are known by then
        async for piece, values in choice.pieces():
            if echo:
                chunks.put_nowait(self.chunk(choice.index, self.prompt_text, None, self._echoed(choice), first=True))
                echo = first = False
            if piece or values:
                chunks.put_nowait(self.chunk(choice.index, piece, None, values, first))
                first = False
        chunks.put_nowait(self.chunk(choice.index, "", choice.finish_reason(), [], first=False))
        chunks.put_nowait(None)
