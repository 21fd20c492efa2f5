"""`distattn.kv_cache`: the static and rolling caches, now in `distattn.cache` (kept for existing imports)."""

from .cache.static import KVCacheManager, LayerKVCache
from .cache.store import WritePlan

__all__ = ["KVCacheManager", "LayerKVCache", "WritePlan"]
