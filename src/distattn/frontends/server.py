"""`distattn serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    distattn serve --model DIR [--port 8000] [--max-running 8 --prefill-chunk 64 --block-size 16]

One engine thread (`engine_loop.EngineLoop`) runs `distattn.runtime.engine.Engine` steps while requests wait or run;
HTTP handlers (FastAPI on uvicorn) queue requests to it and stream its tokens back.
Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` as
server-sent events), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest  # at module level: FastAPI reads the handlers' annotations by name

from .engine_loop import ApiError, EngineLoop, Stream

__all__ = ["ApiError", "Detokenizer", "EngineLoop", "Served", "create_app", "parse_request"]


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


@dataclass
class Served:
    """What the HTTP layer knows: the loop, the tokenizer, names, limits."""

    loop: EngineLoop
    tokenizer: Any
    name: str
    adapters: dict[str, int]
    max_model_len: int
    vocab_size: int
    stop_tokens: set[int]


def _field(body: dict, name: str, kinds: tuple, default: Any, check: Callable[[Any], bool] | None = None, what: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, f"{name}={value!r} is invalid: {what}", param=name)
    if not isinstance(value, kinds) or (check is not None and not check(value)):
        raise ApiError(400, f"{name}={value!r} is invalid: {what}", param=name)
    return value


def parse_request(body: Any, served: Served, chat: bool) -> tuple[list[int], dict, dict]:
    """(prompt ids, engine options, response options) of a request body, or ApiError 400 / 404."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served.name and model not in served.adapters:
        raise ApiError(404, f"The model `{model}` does not exist; this server has {[served.name, *served.adapters]}", param="model",
                       code="model_not_found", kind="NotFoundError")
    sampling, reply = _sampling_fields(body, chat)
    ids = _chat_ids(body, served) if chat else _prompt_ids(body, served)
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    max_tokens = sampling["max_new_tokens"]
    if len(ids) + max_tokens > served.max_model_len:
        raise ApiError(400, f"This model's maximum context length is {served.max_model_len} tokens. However, you requested "
                            f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the completion). "
                            "Please reduce the prompt or max_tokens.", param="max_tokens" if len(ids) < served.max_model_len else "prompt",
                       code="context_length_exceeded")
    adapter = served.adapters.get(model, -1) if model is not None else -1
    options = dict(**sampling, adapter=adapter, stop_tokens=sorted(served.stop_tokens))
    return ids, options, {**reply, "model": model or served.name}


def _sampling_fields(body: dict, chat: bool) -> tuple[dict, dict]:
    """(the engine's sampling options, the response's options) from a request body."""
    max_tokens = _field(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens", (int,), 16,
                        lambda v: v >= 1, "pass a positive integer")
    temperature = float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "pass a number in [0, 2]"))
    top_p = float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "pass a number in (0, 1]"))
    seed = _field(body, "seed", (int,), None, None, "pass an integer")
    n = _field(body, "n", (int,), 1, lambda v: v == 1, "this server returns one choice per request (n=1)")
    stream = _field(body, "stream", (bool,), False, None, "pass true or false")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop={stop!r} is invalid: pass a string or up to 4 non-empty strings", param="stop")
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    return dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed), {"stream": stream, "stops": stops, "n": n}


def _chat_ids(body: dict, served: Served) -> list[int]:
    """The prompt of a chat request: its messages through the model's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects with string content", param="messages")
    if served.tokenizer is None or not served.tokenizer.chat_template:
        raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
    ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _prompt_ids(body: dict, served: Served) -> list[int]:
    """The prompt of a completion request: text through the tokenizer, or token ids as given."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if served.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
        return list(served.tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < served.vocab_size]
        if bad:
            raise ApiError(400, f"prompt token ids {bad[:8]} are outside the vocabulary [0, {served.vocab_size})", param="prompt")
        return list(prompt)
    raise ApiError(400, "prompt must be a string or a non-empty list of token ids (one prompt per request)", param="prompt")


def create_app(served: Served) -> FastAPI:
    """The FastAPI application over `served`."""
    app = FastAPI(title="distattn")
    _install_error_handlers(app)
    _install_info_routes(app, served)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        return await _complete(served, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        return await _complete(served, http, chat=True)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure answered with OpenAI's error body."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: HttpRequest, err: HTTPException) -> JSONResponse:
        kind = "NotFoundError" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind=kind).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HttpRequest, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(err)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_: HttpRequest, err: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", kind="internal_error").body(), status_code=500)


def _install_info_routes(app: FastAPI, served: Served) -> None:
    """/health, /v1/models and /metrics (Prometheus text)."""
    from fastapi.responses import JSONResponse, PlainTextResponse

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = served.loop.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", "error": served.loop.error}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        names = [served.name, *served.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "distattn",
                                            "max_model_len": served.max_model_len} for n in names]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics_text(served))


def _metrics_text(served: Served) -> str:
    engine, m = served.loop.engine, served.loop.metrics
    cache = engine.cache
    total = sum(g.pool.num_blocks for g in cache.groups.values())
    lines = [
        f"distattn:num_requests_running {len(engine.running)}",
        f"distattn:num_requests_waiting {len(engine.waiting)}",
        f"distattn:requests_total {m['requests_total']}",
        f"distattn:generation_tokens_total {m['tokens_total']}",
        f"distattn:time_to_first_token_seconds_sum {m['ttft_sum']}",
        f"distattn:time_to_first_token_seconds_count {m['ttft_count']}",
        f"distattn:kv_cache_blocks_used {cache.blocks_in_use()}",
        f"distattn:kv_cache_blocks_total {total}",
        f"distattn:kv_cache_usage_perc {cache.blocks_in_use() / max(total, 1)}",
        f"distattn:prefix_cache_hits_total {engine.stats['cached_prompt_tokens']}",
        f"distattn:prefix_cache_queries_total {m['prefix_queries_total']}",
    ]
    return "\n".join(lines) + "\n"


async def _complete(served: Served, http: HttpRequest, chat: bool) -> Any:
    """One completion request: parsed, queued on the engine thread, answered whole or streamed."""
    from fastapi.responses import StreamingResponse

    try:
        body = await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not served.loop.alive:
        raise ApiError(503, f"the engine stopped: {served.loop.error}", kind="internal_error")
    ids, options, reply = parse_request(body, served, chat)
    stream = Stream(asyncio.get_running_loop())
    await asyncio.wrap_future(served.loop.submit(stream, ids, options))  # ApiError 400 / 429 from the engine thread
    answer = Completion(served, stream, ids, reply, chat)
    if not reply["stream"]:
        return await answer.whole()
    return StreamingResponse(answer.events(), media_type="text/event-stream")


class Completion:
    """The answer to one queued request: its tokens as text (stop strings held back), whole or as SSE chunks."""

    def __init__(self, served: Served, stream: Stream, ids: list[int], reply: dict, chat: bool) -> None:
        self.served, self.stream, self.ids, self.reply, self.chat = served, stream, ids, reply, chat
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.detok = Detokenizer(served.tokenizer, served.stop_tokens, reply["stops"])
        self.created = int(time.time())

    def chunk(self, text: str, finish: str | None, first: bool = False) -> dict:
        """One streamed chunk (OpenAI's chat.completion.chunk or text_completion)."""
        if self.chat:
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if finish is None or text else {}
            return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.reply["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.reply["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    async def tokens(self) -> AsyncIterator[int]:
        while True:
            token = await self.stream.tokens.get()
            if token is None:
                return
            yield token

    def finish_reason(self) -> str:
        req = self.stream.request
        if self.detok.stopped:
            return "stop"
        if req is None or req.finish_reason == "length":
            return "length"
        return "stop" if req.finish_reason == "stop" else req.finish_reason or "stop"

    def usage(self) -> dict:
        out = len(self.stream.request.out) if self.stream.request is not None else 0
        return {"prompt_tokens": len(self.ids), "completion_tokens": out, "total_tokens": len(self.ids) + out}

    async def whole(self) -> dict:
        """The whole completion in one body, with the token ids (a model without a tokenizer has no text)."""
        text = ""
        async for token in self.tokens():
            text += self.detok.add(token)
            if self.detok.stopped:
                self.served.loop.cancel(self.stream)
                break
        text += self.detok.finish() if not self.detok.stopped else ""
        produced = list(self.stream.request.out) if self.stream.request is not None else []
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason(), "logprobs": None, "token_ids": produced}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.reply["model"], "choices": [choice], "usage": self.usage()}

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: text as it becomes final, then the finish reason and [DONE]."""
        first = True
        try:
            if self.chat:
                yield f"data: {json.dumps(self.chunk('', None, first=True))}\n\n"
                first = False
            async for token in self.tokens():
                piece = self.detok.add(token)
                if piece:
                    yield f"data: {json.dumps(self.chunk(piece, None, first))}\n\n"
                    first = False
                if self.detok.stopped:
                    self.served.loop.cancel(self.stream)
                    break
            rest = self.detok.finish() if not self.detok.stopped else ""
            if rest:
                yield f"data: {json.dumps(self.chunk(rest, None, first))}\n\n"
            yield f"data: {json.dumps(self.chunk('', self.finish_reason()))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a client that went away: its request leaves the batch and frees its blocks at the next step
            if self.stream.request is not None and self.stream.request.running:
                self.served.loop.cancel(self.stream)
