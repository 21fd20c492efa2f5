"""distattn: NxDI-compatible attention for distributed LLM inference on PyTorch."""

from . import hf
from .cache import KVCacheManager, LayerKVCache, PagedKVCacheManager
from .config import AttentionConfig, RopeConfig
from .nxdi.modules.attention.attention_base import NeuronAttentionBase
from .output import NeuronAttentionBaseOutput

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
