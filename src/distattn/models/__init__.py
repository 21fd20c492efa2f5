"""Decoder language models loaded from HF checkpoints (`DecoderLM`); `generate`, `generate_greedy`, `Generation`
and `serve` (the runtime's, `distattn.runtime`) are re-exported here on first use."""

from typing import Any

from .decoder import DecoderLM

__all__ = ["DecoderLM", "Generation", "generate", "generate_greedy", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("Generation", "generate", "generate_greedy"):
        from ..runtime import generate as module

        return getattr(module, name)
    if name == "serve":
        from ..runtime.engine import serve

        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
