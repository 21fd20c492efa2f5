"""distattn: NxDI-compatible attention for distributed LLM inference on PyTorch."""

from . import hf
from .attention import NeuronAttentionBase
from .config import AttentionConfig, RopeConfig
from .kv_cache import KVCacheManager, LayerKVCache
from .output import NeuronAttentionBaseOutput
from .paged import PagedKVCacheManager

__all__ = [
    "AttentionConfig",
    "KVCacheManager",
    "LayerKVCache",
    "NeuronAttentionBase",
    "NeuronAttentionBaseOutput",
    "PagedKVCacheManager",
    "RopeConfig",
    "hf",
]
__version__ = "0.1.0"
