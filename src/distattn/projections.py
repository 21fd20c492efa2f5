"""`distattn.projections`: q/k/v/o projections, now in `distattn.layers.projections` (kept for existing imports)."""

from .layers.projections import HeadShard, build_projections, cut_heads, load_lora, project

__all__ = ["HeadShard", "build_projections", "cut_heads", "load_lora", "project"]
