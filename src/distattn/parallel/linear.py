"""`distattn.parallel.linear`: the parallel linears, now in `distattn.layers.linear` (kept for existing imports)."""

from ..layers.linear import ColumnParallelLinear, RowParallelLinear
from ..layers.quant import int4_dequantize, int4_groups, int8_rows

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "int4_dequantize", "int4_groups", "int8_rows"]
