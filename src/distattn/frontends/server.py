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
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest  # at module level: FastAPI reads the handlers' annotations by name

from .answer import Answer, Choice
from .detokenizer import Detokenizer
from .engine_loop import ApiError, EngineLoop, Stream
from .openai_request import Reply, chat_messages, check_fields, sampling_options

__all__ = ["Answer", "ApiError", "Detokenizer", "EngineLoop", "Served", "create_app", "parse_request"]


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


def parse_request(body: Any, served: Served, chat: bool) -> tuple[list[int], dict, Reply]:
    """(prompt ids, engine options, how to reply) of a request body, or ApiError 400 / 404."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_fields(body, chat)
    model = body.get("model")
    if model is not None and model != served.name and model not in served.adapters:
        raise ApiError(404, f"The model `{model}` does not exist; this server has {[served.name, *served.adapters]}", param="model",
                       code="model_not_found", kind="NotFoundError")
    sampling, reply = sampling_options(body, chat, served.vocab_size)
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
    stops = [] if sampling.pop("ignore_eos") else sorted(served.stop_tokens)
    return ids, dict(**sampling, adapter=adapter, stop_tokens=stops), Reply(model=model or served.name, **reply)


def _chat_ids(body: dict, served: Served) -> list[int]:
    """The prompt of a chat request: its messages through the model's chat template (a template's own refusal,
    `raise_exception`, is the client's error: 400 with its message)."""
    from jinja2 import TemplateError

    messages = chat_messages(body)
    if served.tokenizer is None or not served.tokenizer.chat_template:
        raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
    try:
        ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except TemplateError as err:
        raise ApiError(400, f"the model's chat template refused these messages: {err}", param="messages") from None
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
    """One completion request: parsed, its n choices queued on the engine thread, answered whole or streamed."""
    from fastapi.responses import StreamingResponse

    try:
        body = await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ApiError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply to read") from None
    if not served.loop.alive:
        raise ApiError(503, f"the engine stopped: {served.loop.error}", kind="internal_error")
    ids, options, reply = parse_request(body, served, chat)
    choices: list[Choice] = []
    try:
        for i in range(reply.n):  # choice i samples with seed + i (the engine thread draws one when none is given)
            stream = Stream(asyncio.get_running_loop())
            seeded = options if options["seed"] is None else {**options, "seed": options["seed"] + i}
            await asyncio.wrap_future(served.loop.submit(stream, ids, seeded))  # ApiError 400 / 429 from the engine thread
            choices.append(Choice(served.loop, served.tokenizer, served.stop_tokens, stream, i, reply))
    except ApiError:
        for choice in choices:
            choice.cancel_if_running()
        raise
    answer = Answer(served.tokenizer, ids, _prompt_text(body, ids, served) if reply.echo else "", reply, chat, choices)
    if not reply.stream:
        return await answer.whole()
    return StreamingResponse(answer.events(), media_type="text/event-stream")


def _prompt_text(body: dict, ids: list[int], served: Served) -> str:
    """What echo returns: the prompt string as sent, or the text of its token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    return served.tokenizer.decode(ids) if served.tokenizer is not None else ""
