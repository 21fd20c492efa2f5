"""`distattn.models.accuracy`: quantization accuracy, now in `distattn.runtime.accuracy` (kept for existing imports)."""

from ..runtime.accuracy import agreement, decode_logits

__all__ = ["agreement", "decode_logits"]
