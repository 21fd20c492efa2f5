"""The backend interface and registry."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
import torch

logger = logging.getLogger("distattn")


@dataclass(frozen=True)
class AttentionSpec:
    """What a kernel call must compute besides q, k, v and positions."""

    scale: float  # multiplier on q.k
    sliding_window: int | None = None  # see distattn.ops.masks.visible
    chunk_size: int | None = None


class Backend:
    """An attention kernel: subclass it, set `name`, and define `supports` and `attend`.

    Capabilities are fields a backend sets, never looked up by name:
    - `fuses_sinks`: `attend(..., sinks=)` applies learned sinks itself and returns no
      log-sum-exp (it cannot serve a call that merges partial results);
    - `takes_plain_causal`: `attend(..., plain_causal=)` is given whether the mask is exactly
      "key index <= query index" (True), known not to be (False) or unknown (None), which a
      model call finds once for all layers.
    `worthwhile(q, k, spec) -> None | reason` says where "auto" should take it (default: wherever
    it supports the call).

    `attend` takes q `[B, Hq, Sq, D]`, k and v `[B, Hkv, Sk, D]`, q_pos `[B, Sq]`,
    k_pos `[B, Sk]` (negative = invalid key) and an optional bool mask
    `[B, 1, Sq, Sk]`, and returns `out [B, Hq, Sq, D]` (q's dtype, zeros where a
    query sees no key) and `lse [B, Hq, Sq]` (fp32, fp64 for fp64 inputs; -inf
    where a query sees no key).
    """

    name: str = ""
    fuses_sinks: bool = False
    takes_plain_causal: bool = False

    def supports(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> str | None:
        """None when this backend can run the call, else the reason it cannot."""
        raise NotImplementedError

    def worthwhile(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> str | None:
        """None where "auto" should take this backend (when it supports the call), else why not."""
        return None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        spec: AttentionSpec,
        mask: torch.Tensor | None = None,
        plain_causal: bool | None = None,
        sinks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out, lse) of one call (lse None only from a backend that `fuses_sinks`); `plain_causal` and `sinks` reach
        only backends that declare them."""
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}
_LOGGED: set[tuple] = set()  # auto choices already logged (logging only; no effect on results)
_LOG_LOCK = threading.Lock()


def _log_choice(name: str, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> None:
    """Log each distinct automatic choice once, at INFO (not while being compiled: tracing
    a lock would split the graph, and the eager warm-up step has logged it)."""
    if torch.compiler.is_compiling():
        return
    stage = "decode" if q.shape[2] <= 16 else "prefill"
    route = "window" if spec.sliding_window else "chunk" if spec.chunk_size else "causal"
    key = (name, stage, route, q.dtype, q.device.type)
    with _LOG_LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    logger.info("attention kernel %s for %s %s %s on %s", name, stage, route, str(q.dtype).replace("torch.", ""), q.device.type)
_AUTO_ORDER: list[str] = []


def register(backend: Backend, *, auto: bool = True) -> Backend:
    """Add a backend (a `Backend` subclass); `auto=True` puts it in the "auto" order after earlier ones."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register() takes a distattn.kernels.Backend subclass instance, got {type(backend).__name__}: "
                        "subclass Backend (its fields declare what the kernel can do)")
    _REGISTRY[backend.name] = backend
    if auto:
        _AUTO_ORDER.append(backend.name)
    return backend


def available_backends() -> list[str]:
    """Registered backend names, "auto" order first."""
    return list(_AUTO_ORDER) + [n for n in _REGISTRY if n not in _AUTO_ORDER]


def get_backend(name: str) -> Backend:
    """The backend registered under `name`; ValueError listing the choices otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"kernel={name!r} is unknown: use 'auto' or one of {available_backends()}")
    return _REGISTRY[name]


def _reason(backend: Backend, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, need_lse: bool) -> str | None:
    if need_lse and backend.fuses_sinks:
        return "it returns no log-sum-exp, and this call merges partial results (decode, context parallel)"
    return backend.supports(q, k, spec)


def select_backend(name: str, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, *, need_lse: bool = True) -> Backend:
    """Resolve `name` ("auto" or a backend name) for this call.

    "auto" takes the first backend in order that supports the call (and, where a
    backend says so, where it measured faster). An explicit name that cannot run
    raises ValueError with its reason; there is no silent fallback. need_lse=False:
    the call is one block whose sinks the backend may apply itself.
    """
    if name != "auto":
        backend = get_backend(name)
        reason = _reason(backend, q, k, spec, need_lse)
        if reason is not None:
            raise ValueError(f"kernel={name!r} cannot run this call: {reason}; pass kernel='auto' or another backend")
        return backend
    reasons = []
    for candidate in _AUTO_ORDER:
        backend = _REGISTRY[candidate]
        # "worthwhile" first: a backend auto would not pick costs nothing (supports() may compile)
        reason = backend.worthwhile(q, k, spec)
        if reason is None:
            reason = _reason(backend, q, k, spec, need_lse)
        if reason is None:
            _log_choice(backend.name, q, k, spec)
            return backend
        reasons.append(f"{candidate}: {reason}")
    raise ValueError("no attention backend supports this call (" + "; ".join(reasons) + ")")
