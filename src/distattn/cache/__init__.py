"""KV caches behind one interface (`store.KVStore`): static and rolling (`static`), paged (`paged`)."""

from .paged import BlockGroup, BlockPool, PagedKVCacheManager, PagedLayerCache, PoolExhausted
from .static import KVCacheManager, LayerKVCache, LayerStack
from .store import KVStore, WritePlan

__all__ = ["BlockGroup", "BlockPool", "KVCacheManager", "KVStore", "LayerKVCache", "LayerStack", "PagedKVCacheManager",
           "PagedLayerCache", "PoolExhausted", "WritePlan"]
