"""Layers: attention (given a step), parallel linears, weight formats (`quant`), LoRA, projections."""
