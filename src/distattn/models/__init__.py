"""Decoder language models built on NeuronAttentionBase, loaded from HF checkpoints."""

from .decoder import DecoderLM
from .generate import Generation, generate, generate_greedy
from .serving import serve

__all__ = ["DecoderLM", "Generation", "generate", "generate_greedy", "serve"]
