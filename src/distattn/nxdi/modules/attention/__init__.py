"""distattn.nxdi.modules.attention: `attention_base` (NeuronAttentionBase, QKNormPlacement) and `utils` (RotaryEmbedding)."""
