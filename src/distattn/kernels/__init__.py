"""Attention backends behind one call signature, chosen by a small registry.

Every backend computes `attend(q, k, v, q_pos=, k_pos=, spec=, mask=) -> (out, lse)`
over one rank's tensors, without sinks: the module merges partial results and
applies sinks once (`distattn.ops.merge`).
"""

from .base import AttentionSpec, Backend, available_backends, get_backend, register, select_backend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend

# "auto" order: the fused kernel first, the specification last (it runs everything).
register(SdpaBackend())
register(ReferenceBackend())

__all__ = ["AttentionSpec", "Backend", "available_backends", "get_backend", "register", "select_backend"]
