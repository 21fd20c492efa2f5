"""Parallelism: process groups, head layouts, collectives (`comm`, the only caller of torch.distributed),
prompt / batch splits, and the context- and data-parallel plans (`plans`, applied to layers from outside).

`ColumnParallelLinear` / `RowParallelLinear` live in `distattn.layers.linear` (re-exported here on first use).
"""

from typing import Any

from . import comm
from .groups import ParallelGroups
from .layout import GQAStrategy, HeadLayout

__all__ = ["comm", "ColumnParallelLinear", "GQAStrategy", "HeadLayout", "ParallelGroups", "RowParallelLinear"]


def __getattr__(name: str) -> Any:
    if name in ("ColumnParallelLinear", "RowParallelLinear"):
        from ..layers import linear

        return getattr(linear, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
