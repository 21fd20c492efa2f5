"""An OpenAI completions / chat request body as the engine's options and the reply's shape.

Every field OpenAI's API (and vLLM's extensions load generators send: `ignore_eos`, `min_tokens`)
defines for these endpoints is read and checked here; a field the server does not implement, or does
not know, is a 400 naming it, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..runtime.engine import MAX_LOGPROBS
from ..runtime.sampler import LogitRules
from .engine_loop import ApiError

COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
          "logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "user", "ignore_eos", "min_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "response_format",
                        "parallel_tool_calls", "modalities", "audio", "prediction", "store", "metadata", "service_tier",
                        "reasoning_effort", "web_search_options"}
UNSUPPORTED_UNLESS_EMPTY = ("tools", "tool_choice", "functions", "function_call", "response_format", "modalities", "audio",
                            "prediction", "suffix", "web_search_options", "reasoning_effort")
MAX_N = 16


@dataclass(frozen=True)
class Reply:
    """How one request is answered."""

    model: str
    stream: bool
    stops: list[str]  # stop strings
    n: int  # choices
    echo: bool  # completions: the prompt's text (and log-probabilities) first
    logprobs: int | None  # alternatives with each token's log-probability; None: no log-probabilities
    include_usage: bool  # stream: a last chunk with the usage
    continuous_usage: bool  # stream: the usage so far in every chunk


def field_of(body: dict, name: str, kinds: tuple, default: Any, check: Callable[[Any], bool] | None = None, what: str = "") -> Any:
    """body[name] (the default when absent or null), ApiError 400 naming it when not of `kinds` or not `check`ed."""
    value = body.get(name, default)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds) or (check is not None and not check(value)):
        raise ApiError(400, f"{name}={value!r} is invalid: {what}", param=name)
    return value


def check_fields(body: dict, chat: bool) -> None:
    """400 for a field this endpoint does not know, or one it does not implement set to something."""
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]} (this server reads {sorted(known)})", param=unknown[0])
    for name in UNSUPPORTED_UNLESS_EMPTY:
        if body.get(name) not in (None, [], {}, "", "none", "auto") or (name == "tool_choice" and body.get(name) == "required"):
            raise ApiError(400, f"{name} is not supported by this server: send the request without it", param=name)


def sampling_options(body: dict, chat: bool, vocab: int) -> tuple[dict, dict]:
    """(the engine's options, `Reply`'s fields but the model) from the sampling fields of a body (`check_fields` passed);
    the engine's include ignore_eos (the caller drops the end tokens)."""
    max_tokens = _max_tokens(body)
    temperature = float(field_of(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "pass a number in [0, 2]"))
    top_p = float(field_of(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "pass a number in (0, 1]"))
    seed = field_of(body, "seed", (int,), None, None, "pass an integer")
    n = field_of(body, "n", (int,), 1, lambda v: 1 <= v <= MAX_N, f"pass an integer in [1, {MAX_N}]")
    field_of(body, "best_of", (int,), n, lambda v: v == n, f"this server returns every one of the n={n} choices: best_of must equal n")
    stream = field_of(body, "stream", (bool,), False, None, "pass true or false")
    usage, continuous = _stream_options(body, stream)
    echo = False if chat else field_of(body, "echo", (bool,), False, None, "pass true or false")
    logprobs = _logprobs(body, chat)
    ignore_eos = field_of(body, "ignore_eos", (bool,), False, None, "pass true or false")
    rules = LogitRules(
        bias=_logit_bias(body, vocab),
        presence_penalty=float(field_of(body, "presence_penalty", (int, float), 0.0, lambda v: -2 <= v <= 2, "pass a number in [-2, 2]")),
        frequency_penalty=float(field_of(body, "frequency_penalty", (int, float), 0.0, lambda v: -2 <= v <= 2, "pass a number in [-2, 2]")),
        min_tokens=field_of(body, "min_tokens", (int,), 0, lambda v: 0 <= v <= max_tokens, f"pass an integer in [0, max_tokens={max_tokens}]"),
    )
    engine = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, rules=rules, logprobs=logprobs,
                  prompt_logprobs=logprobs if echo and logprobs is not None else None, ignore_eos=ignore_eos)
    reply = dict(stream=stream, stops=_stops(body), n=n, echo=echo, logprobs=logprobs, include_usage=usage, continuous_usage=continuous)
    return engine, reply


def _max_tokens(body: dict) -> int:
    """max_completion_tokens (OpenAI's newer name) or max_tokens; both only when they agree."""
    check, what = (lambda v: v >= 1), "pass a positive integer"
    newer = field_of(body, "max_completion_tokens", (int,), None, check, what)
    older = field_of(body, "max_tokens", (int,), None, check, what)
    if newer is not None and older is not None and newer != older:
        raise ApiError(400, f"max_tokens={older} and max_completion_tokens={newer} disagree: pass one of them", param="max_completion_tokens")
    return newer if newer is not None else older if older is not None else 16


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of stream_options; only with stream: true."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise ApiError(400, f"stream_options={options!r} is invalid: pass {{\"include_usage\": true or false}} "
                            "(and vLLM's continuous_usage_stats)", param="stream_options")
    usage = field_of(options, "include_usage", (bool,), False, None, "pass true or false")
    continuous = field_of(options, "continuous_usage_stats", (bool,), False, None, "pass true or false")
    return usage, continuous


def _logprobs(body: dict, chat: bool) -> int | None:
    """Alternatives per token, or None: chat's logprobs (bool) + top_logprobs, completions' logprobs (int)."""
    if not chat:
        return field_of(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS, f"pass an integer in [0, {MAX_LOGPROBS}]")
    wanted = field_of(body, "logprobs", (bool,), False, None, "pass true or false")
    top = field_of(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS, f"pass an integer in [0, {MAX_LOGPROBS}]")
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    """logit_bias {"token id": bias in [-100, 100]} as (token, bias) pairs."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ApiError(400, f"logit_bias={bias!r} is invalid: pass an object mapping token ids to numbers in [-100, 100]", param="logit_bias")
    pairs = []
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else None
        if token is None or not 0 <= token < vocab:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model's vocabulary [0, {vocab})", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias[{key!r}]={value!r} is invalid: pass a number in [-100, 100]", param="logit_bias")
        pairs.append((token, float(value)))
    return tuple(pairs)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop={stop!r} is invalid: pass a string or up to 4 non-empty strings", param="stop")
    return stops


def chat_messages(body: dict) -> list[dict]:
    """The messages of a chat body, each {role, content} with string content (an array of text parts joined)."""
    messages = body.get("messages")
    shape = "messages must be a non-empty list of {role, content} objects with string content (or an array of text parts)"
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, shape, param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, shape, param="messages")
        out.append({**message, "content": _content(message.get("content"), i, shape)})
    return out


def _content(content: Any, i: int, shape: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise ApiError(400, shape, param="messages")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"messages[{i}].content: a part of type {kind!r}; this model reads text parts only "
                                "({\"type\": \"text\", \"text\": ...})", param="messages")
        texts.append(part["text"])
    return "\n".join(texts)
