"""`distattn.lora`: LoRA adapters, now in `distattn.layers.lora` (kept for existing imports)."""

from .layers.lora import LoraAdapter, LoraWeights, check_lora_fits, lora_delta

__all__ = ["LoraAdapter", "LoraWeights", "check_lora_fits", "lora_delta"]
