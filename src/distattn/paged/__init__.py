"""`distattn.paged`: the paged KV cache, now in `distattn.cache.paged` (see its docstring; kept for existing imports)."""

from ..cache.paged import BlockGroup, BlockPool, PagedKVCacheManager, PagedLayerCache, PoolExhausted

__all__ = ["BlockGroup", "BlockPool", "PagedKVCacheManager", "PagedLayerCache", "PoolExhausted"]
