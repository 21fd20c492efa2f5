"""All-or-nothing changes to a module: check everything, then write, and undo the writes if one fails."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _has_data(t: torch.Tensor) -> bool:
    """False for the stride-0 placeholders packed layers keep in place of their weight."""
    return t.numel() <= 1 or 0 not in t.stride()


@contextmanager
def all_or_nothing(module: nn.Module, *, values: bool = True) -> Iterator[None]:
    """Run the block; if it raises, put `module` back as it was and re-raise.

    Restores every submodule's attributes (objects reassigned: packed weights, LoRA tensors,
    adapter names) and, with `values`, the contents of parameters and buffers written in place
    (copied first: one extra copy of the module while the block runs).
    """
    state = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    saved = []
    if values:
        for m in module.modules():
            for t in [*m._parameters.values(), *m._buffers.values()]:
                if t is not None and _has_data(t):
                    saved.append((t, t.detach().clone()))
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, attrs, params, buffers in state:
                m.__dict__.clear()
                m.__dict__.update(attrs)
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
            for t, copy in saved:
                t.copy_(copy)
        raise
