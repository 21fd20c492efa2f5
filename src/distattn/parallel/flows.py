"""`distattn.parallel.flows`: the context- and data-parallel plans, now `distattn.parallel.plans` (kept for existing imports)."""

from .plans import context_parallel_prefill, data_parallel_decode, gather_prompt, run_attention, split_prompt

__all__ = ["context_parallel_prefill", "data_parallel_decode", "gather_prompt", "run_attention", "split_prompt"]
