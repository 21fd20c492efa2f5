"""`distattn.models.serving`: continuous batching, now in `distattn.runtime.engine` (kept for existing imports)."""

from ..runtime.engine import Engine, Request, serve

__all__ = ["Engine", "Request", "serve"]
