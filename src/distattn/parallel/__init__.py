"""Tensor parallelism: process groups, head layouts, parallel linear layers, collectives.

`comm` is the only module that calls torch.distributed collectives.
"""

from . import comm, flows
from .groups import ParallelGroups
from .layout import GQAStrategy, HeadLayout
from .linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["comm", "flows", "ColumnParallelLinear", "GQAStrategy", "HeadLayout", "ParallelGroups", "RowParallelLinear"]
