"""Checks of the plain values a user passes to the public entries (generate, serve, loaders, caches).

Each check raises before anything changes: ValueError for a bad value, TypeError for a
wrong kind of object, and the message names the argument and how to fix it. The
forward's tensor checks live in `distattn.validation`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def positive_int(name: str, value: object) -> int:
    """`value` as an int > 0 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: pass a positive integer")
    return value


def int_in(name: str, value: object, low: int, high: int) -> int:
    """`value` as an int in [low, high] (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is invalid: pass an integer in [{low}, {high}]")
    return value


def real(name: str, value: object, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float within [low, high] (open ends where asked; bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid: pass a finite number")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is invalid: pass a number in {interval}")
    return float(value)


def optional_int(name: str, value: object) -> int | None:
    """None or an int (bools refused)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name}={value!r} must be an integer or None")
    return value


def flag(name: str, value: object) -> bool:
    """A real bool (not 1, not "yes")."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False")
    return value


def token_ids(name: str, ids: object, vocab_size: int, *, allow_empty: bool = False) -> list[int]:
    """A sequence of token ids, each an int in [0, vocab_size)."""
    if isinstance(ids, (str, bytes, torch.Tensor)) or not isinstance(ids, Sequence):
        hint = " (a tensor: pass tensor.tolist())" if isinstance(ids, torch.Tensor) else ""
        raise TypeError(f"{name} must be a list of token ids (ints){hint}, got {type(ids).__name__}")
    if not ids and not allow_empty:
        raise ValueError(f"{name} is empty: pass at least one token id")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"{name}[{i}]={token!r} is not a token id: pass ints (a text prompt needs the tokenizer first)")
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name}[{i}]={token} is outside the vocabulary [0, {vocab_size})")
    return list(ids)


def prompt_list(prompts: object, vocab_size: int) -> list[list[int]]:
    """A non-empty list of non-empty token id lists, every id in the vocabulary."""
    if isinstance(prompts, torch.Tensor):
        raise TypeError("prompts must be a list of token id lists, got a tensor: pass tensor.tolist()")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    return [token_ids(f"prompts[{i}]", p, vocab_size) for i, p in enumerate(prompts)]


def float_dtype(name: str, value: object) -> torch.dtype:
    """A floating-point torch.dtype."""
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{name}={value!r} must be a floating-point torch.dtype such as torch.float32 or torch.bfloat16")
    return value


def input_ids(ids: object, vocab_size: int) -> torch.Tensor:
    """A model call's token ids: an integer tensor `[B, S]` with every id in [0, vocab_size) (one host sync)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor [batch, seq] of token ids, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor [batch, seq], got shape {list(ids.shape)} {ids.dtype}")
    if ids.numel() and bool(((ids < 0) | (ids >= vocab_size)).any()):
        bad = ids[(ids < 0) | (ids >= vocab_size)].unique().tolist()
        raise ValueError(f"input_ids holds {bad[:8]} outside the vocabulary [0, {vocab_size})")
    return ids

