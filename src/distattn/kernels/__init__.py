"""Attention backends behind one call signature, chosen by a small registry.

Every backend computes `attend(q, k, v, q_pos=, k_pos=, spec=, mask=) -> (out, lse)`
over one rank's tensors, without sinks: the module merges partial results and
applies sinks once (`distattn.ops.merge`).
"""

from .base import AttentionSpec, Backend, available_backends, get_backend, register, select_backend
from .blocked import BlockedBackend
from .flex import FlexBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend

# "auto" order: compiled FlexAttention for long windowed / chunked prefill, block
# skipping where a window or chunk leaves keys to skip (each measured faster there,
# benchmarks/attention_bench.py), then the fused kernel, then the specification (it
# runs everything).
register(FlexBackend())
register(BlockedBackend())
register(SdpaBackend())
register(ReferenceBackend())

__all__ = ["AttentionSpec", "Backend", "available_backends", "get_backend", "register", "select_backend"]
