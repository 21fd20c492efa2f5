"""Decoder language models built on NeuronAttentionBase, loaded from HF checkpoints."""

from .decoder import DecoderLM
from .generate import Generation, generate, generate_greedy

__all__ = ["DecoderLM", "Generation", "generate", "generate_greedy"]
