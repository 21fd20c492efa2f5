"""The engine's own thread behind `distattn serve`: it takes queued requests and cancellations and runs
`Engine` steps while there is work, handing each HTTP request its tokens through a `Stream`."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runtime.engine import Engine, Request
from ..runtime.sampler import seed_for


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
        self.streams: dict[int, Stream] = {}  # rank 0: request key -> the stream of a request that runs
        self.requests: dict[int, Request] = {}  # request key -> the engine's request while it runs (every rank)
        self.key_of: dict[int, int] = {}  # id(engine request) -> its key
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
        ops: list[tuple] = []
        block = not self.engine.has_work()
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
                if options.get("seed") is None:  # drawn here, so every rank draws the same samples
                    options = {**options, "seed": seed_for(None, options.get("temperature", 0.0))}
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
                            self._finished(req)
        except Exception as err:  # the engine cannot go on: say so, fail what waits, and let /health answer 503
            self.error = f"{type(err).__name__}: {err}"
            self.alive = False
            print(f"distattn serve: the engine stopped on rank {self.rank}: {self.error}", flush=True)
            for req in self.engine.waiting + self.engine.running:
                req.finish_reason = "error"
                stream = self.streams.get(self.key_of.get(id(req), -1))
                if stream is not None:
                    stream.push(None)
            if self.rank != 0:
                raise

    def _on_token(self, stream: Stream) -> Callable[[Request, int], None]:
        """What the engine calls with each token of the request behind `stream` (its metrics counted)."""
        def on_token(req: Request, token: int) -> None:
            if stream.first_token is None:
                stream.first_token = time.perf_counter()
                self.metrics["ttft_sum"] += stream.first_token - stream.submitted
                self.metrics["ttft_count"] += 1
            self.metrics["tokens_total"] += 1
            stream.push(token)

        return on_token

    def _finished(self, request: Request) -> None:
        """A request left the engine: forget it, and end its stream."""
        key = self.key_of.pop(id(request), -1)
        self.requests.pop(key, None)
        stream = self.streams.pop(key, None)
        if stream is not None:
            stream.push(None)

    def _apply(self, op: tuple) -> None:
        """One operation, on every rank in the same order (rank 0 also answers its HTTP side)."""
        if op[0] == "cancel":
            request = self.requests.get(op[1])
            if request is not None:
                self.engine.cancel(request)
            return
        _, key, prompt, options = op
        stream, done = self.pending.pop(key, (None, None))
        if self.load() >= self.max_queue:
            if done is not None:
                done.set_exception(ApiError(429, f"the server has {self.load()} requests waiting or running (--max-queue "
                                                 f"{self.max_queue}); retry later", code="queue_full", kind="rate_limit_error"))
            return

        try:
            request = self.engine.add(prompt, on_token=None if stream is None else self._on_token(stream), **options)
        except (ValueError, TypeError) as err:
            if done is not None:
                done.set_exception(ApiError(400, str(err)))
            return
        self.requests[key], self.key_of[id(request)] = request, key
        self.metrics["requests_total"] += 1
        self.metrics["prefix_queries_total"] += len(prompt)
        if stream is not None and done is not None:
            stream.request = request
            self.streams[key] = stream
            done.set_result(request)


