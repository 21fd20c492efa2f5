"""Decoder language models built on NeuronAttentionBase, loaded from HF checkpoints."""

from .decoder import DecoderLM
from .generate import generate_greedy

__all__ = ["DecoderLM", "generate_greedy"]
