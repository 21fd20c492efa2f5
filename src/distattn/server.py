"""`distattn serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    distattn serve --model DIR [--port 8000] [--max-running 8 --prefill-chunk 64 --block-size 16]

One engine thread runs `distattn.models.serving.Engine` steps while requests wait or run;
HTTP handlers (FastAPI on uvicorn) queue requests to it and stream its tokens back.
Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` as
server-sent events), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request as HttpRequest  # at module level: FastAPI reads the handlers' annotations by name

from .models.serving import Engine, Request


class ApiError(Exception):
    """An error answered with OpenAI's body and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Stream:
    """What the engine thread hands one HTTP request: its tokens as they come, then None."""

    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: Request | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def push(self, token: int | None) -> None:
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, token)


class EngineLoop:
    """The engine's own thread: takes queued requests and cancellations, runs steps while there is work.

    Under tensor parallelism every rank runs this loop on its shard of the model: rank 0 (which serves
    HTTP) decides each iteration's operations (requests added, refused or cancelled, in order) and
    broadcasts them, so every rank's engine admits, steps and samples alike; idle, rank 0 sends an empty
    list every second so the others never wait past the process group's timeout.
    """

    def __init__(self, engine: Engine, max_queue: int, *, broadcast: Callable[[list], list] | None = None, rank: int = 0) -> None:
        self.engine, self.max_queue, self.broadcast, self.rank = engine, max_queue, broadcast, rank
        self.commands: queue.Queue = queue.Queue()
        self.pending: dict[int, tuple[Stream, Future]] = {}  # rank 0: request key -> its stream and future
        self.streams: dict[int, Stream] = {}
        self.next_key = 0
        self.alive = False
        self.error: str | None = None
        self.metrics = {"requests_total": 0, "tokens_total": 0, "ttft_sum": 0.0, "ttft_count": 0, "prefix_queries_total": 0}
        self.thread = threading.Thread(target=self.run, name="distattn-engine", daemon=True)

    def start(self) -> None:
        self.alive = True
        self.thread.start()

    def submit(self, stream: Stream, prompt: list[int], options: dict) -> Future:
        """Queue a request (from any thread); the future holds its Request, or the error `Engine.add` raised."""
        done: Future = Future()
        self.commands.put(("add", stream, prompt, options, done))
        return done

    def cancel(self, stream: Stream) -> None:
        self.commands.put(("cancel", stream, None, None, None))

    def load(self) -> int:
        """Requests waiting or running."""
        return len(self.engine.waiting) + len(self.engine.running)

    def _collect(self) -> list:
        """Rank 0: this iteration's operations from the HTTP side (waits up to 1 s when there is no work)."""
        ops, block = [], not self.engine.has_work()
        try:
            while True:
                what, stream, prompt, options, done = self.commands.get(timeout=1.0) if block else self.commands.get_nowait()
                block = False
                if what == "cancel":
                    key = next((k for k, s in self.streams.items() if s is stream), None)
                    if key is not None:
                        ops.append(("cancel", key))
                    continue
                key, self.next_key = self.next_key, self.next_key + 1
                self.pending[key] = (stream, done)
                if options.get("seed") is None and options.get("temperature", 0.0) > 0:  # every rank must draw the same samples
                    options = {**options, "seed": int(torch.randint(0, 2**62, ()).item())}
                ops.append(("add", key, prompt, options))
        except queue.Empty:
            return ops

    def run(self) -> None:
        """The loop (rank 0 in a thread; other ranks in their main thread)."""
        self.alive = True
        try:
            with torch.inference_mode():
                while True:
                    ops = self._collect() if self.rank == 0 else []
                    if self.broadcast is not None:
                        ops = self.broadcast(ops)
                    for op in ops:
                        self._apply(op)
                    if self.engine.has_work():
                        for req in self.engine.step():
                            stream = getattr(req, "stream", None)
                            if stream is not None:
                                self.streams.pop(req.key, None)  # type: ignore[attr-defined]
                                stream.push(None)
        except Exception as err:  # the engine cannot go on: say so, fail what waits, and let /health answer 503
            self.error = f"{type(err).__name__}: {err}"
            self.alive = False
            print(f"distattn serve: the engine stopped on rank {self.rank}: {self.error}", flush=True)
            for req in self.engine.waiting + self.engine.running:
                req.finish_reason = "error"
                if getattr(req, "stream", None) is not None:
                    req.stream.push(None)  # type: ignore[attr-defined]
            if self.rank != 0:
                raise

    def _apply(self, op: tuple) -> None:
        """One operation, on every rank in the same order (rank 0 also answers its HTTP side)."""
        if op[0] == "cancel":
            for req in self.engine.waiting + self.engine.running:
                if getattr(req, "key", None) == op[1]:
                    self.engine.cancel(req)
            return
        _, key, prompt, options = op
        stream, done = self.pending.pop(key, (None, None))
        if self.load() >= self.max_queue:
            if done is not None:
                done.set_exception(ApiError(429, f"the server has {self.load()} requests waiting or running (--max-queue "
                                                 f"{self.max_queue}); retry later", code="queue_full", kind="rate_limit_error"))
            return

        def on_token(req: Request, token: int) -> None:
            if stream.first_token is None:
                stream.first_token = time.perf_counter()
                self.metrics["ttft_sum"] += stream.first_token - stream.submitted
                self.metrics["ttft_count"] += 1
            self.metrics["tokens_total"] += 1
            stream.push(token)

        try:
            request = self.engine.add(prompt, on_token=on_token if stream is not None else None, **options)
        except (ValueError, TypeError) as err:
            if done is not None:
                done.set_exception(ApiError(400, str(err)))
            return
        request.key = key  # type: ignore[attr-defined]
        request.stream = stream  # type: ignore[attr-defined]
        self.metrics["requests_total"] += 1
        self.metrics["prefix_queries_total"] += len(prompt)
        if stream is not None:
            stream.request = request
            self.streams[key] = stream
            done.set_result(request)  # type: ignore[union-attr]


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
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects with string content", param="messages")
        if served.tokenizer is None or not getattr(served.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if served.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
            ids = served.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < served.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token ids {bad[:8]} are outside the vocabulary [0, {served.vocab_size})", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt must be a string or a non-empty list of token ids (one prompt per request)", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(ids) + max_tokens > served.max_model_len:
        raise ApiError(400, f"This model's maximum context length is {served.max_model_len} tokens. However, you requested "
                            f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the completion). "
                            "Please reduce the prompt or max_tokens.", param="max_tokens" if len(ids) < served.max_model_len else "prompt",
                       code="context_length_exceeded")
    adapter = served.adapters.get(model, -1) if model is not None else -1
    options = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, adapter=adapter,
                   stop_tokens=sorted(served.stop_tokens))
    return ids, options, {"stream": stream, "stops": stops, "model": model or served.name, "n": n}


def create_app(served: Served):  # noqa: ANN201 (a FastAPI app)
    """The FastAPI application over `served`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="distattn")

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
        return PlainTextResponse("\n".join(lines) + "\n")

    async def run(http: HttpRequest, chat: bool) -> Any:
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not served.loop.alive:
            raise ApiError(503, f"the engine stopped: {served.loop.error}", kind="internal_error")
        ids, options, reply = parse_request(body, served, chat)
        stream = Stream(asyncio.get_running_loop())
        await asyncio.wrap_future(served.loop.submit(stream, ids, options))  # ApiError 400 / 429 from the engine thread
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        detok = Detokenizer(served.tokenizer, served.stop_tokens, reply["stops"])
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def chunk(text: str, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": text} if first else {"content": text}) if finish is None or text else {}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": reply["model"],
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return {"id": rid, "object": "text_completion", "created": created, "model": reply["model"],
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        async def tokens() -> AsyncIterator[int]:
            while True:
                token = await stream.tokens.get()
                if token is None:
                    return
                yield token

        def finish_reason() -> str:
            req = stream.request
            return "stop" if detok.stopped else ("length" if req is None or req.finish_reason == "length" else
                                                 "stop" if req.finish_reason == "stop" else req.finish_reason or "stop")

        def usage() -> dict:
            out = len(stream.request.out) if stream.request is not None else 0
            return {"prompt_tokens": len(ids), "completion_tokens": out, "total_tokens": len(ids) + out}

        if not reply["stream"]:
            text = ""
            async for token in tokens():
                text += detok.add(token)
                if detok.stopped:
                    served.loop.cancel(stream)
                    break
            text += detok.finish() if not detok.stopped else ""
            produced = list(stream.request.out) if stream.request is not None else []  # the ids too (a model without a tokenizer has no text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(), "logprobs": None,
                       "token_ids": produced}
                      if chat else {"index": 0, "text": text, "finish_reason": finish_reason(), "logprobs": None, "token_ids": produced})
            return {"id": rid, "object": kind, "created": created, "model": reply["model"], "choices": [choice], "usage": usage()}

        async def events() -> AsyncIterator[str]:
            first = True
            try:
                if chat:
                    yield f"data: {json.dumps(chunk('', None, first=True))}\n\n"
                    first = False
                async for token in tokens():
                    piece = detok.add(token)
                    if piece:
                        yield f"data: {json.dumps(chunk(piece, None, first))}\n\n"
                        first = False
                    if detok.stopped:
                        served.loop.cancel(stream)
                        break
                rest = detok.finish() if not detok.stopped else ""
                if rest:
                    yield f"data: {json.dumps(chunk(rest, None, first))}\n\n"
                yield f"data: {json.dumps(chunk('', finish_reason()))}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # a client that went away: its request leaves the batch and frees its blocks at the next step
                if stream.request is not None and stream.request.running:
                    served.loop.cancel(stream)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        return await run(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        return await run(http, chat=True)

    return app
