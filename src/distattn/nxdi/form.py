"""What an NxDI-form layer does differently at forward time, and the attributes NxDI code reads."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch


class QKNormPlacement(enum.Enum):
    """Where `use_qk_norm` normalises q and k: before RoPE or after it (Llama 4)."""

    PRE_ROPE = 0
    POST_ROPE = 1


@dataclass(frozen=True)
class NxdiForm:
    """The NxDI behaviours of one layer (None on a layer built from an AttentionConfig).

    - polar_rope: RoPE from `rope_theta` (Meta's interleaved pairs) applies only on calls
      with `use_polar_compatible_rope=True`, as NxDI's Llama 4 layers pass it (NoPE
      layers pass False);
    - use_qk_norm: `module.qk_norm` (a weightless RMSNorm unless the subclass replaces
      it) normalises q and k per head, after RoPE when qk_norm_after_rope;
    - fuse_norm: `rmsnorm` and `residual` reach the QKV step only where NxDI's fused QKV
      kernel would take them (`neuron_config.qkv_kernel_enabled`); otherwise the decoder
      layer norms itself, `rmsnorm` is not applied and `residual` comes back unchanged.
    """

    polar_rope: bool
    use_qk_norm: bool
    qk_norm_after_rope: bool
    fuse_norm: bool


# forward keywords NxDI's decoder layers pass besides the 14 parameters
NXDI_FORWARD_EXTRAS = ("use_polar_compatible_rope",)


def nxdi_forward_options(form: NxdiForm, has_rotary_module: bool, extra: dict[str, Any]) -> bool:
    """Pop NxDI's extra forward keywords from `extra`; return whether RoPE applies to this call."""
    polar = bool(extra.pop("use_polar_compatible_rope", False))
    if form.polar_rope:
        return polar
    if polar and has_rotary_module:
        raise ValueError(
            "use_polar_compatible_rope=True needs a layer built with rope_theta and no rotary_emb; "
            "this layer's RoPE comes from its rotary_emb module"
        )
    return True


def set_nxdi_attributes(module: Any, dtype: torch.dtype) -> None:
    """The attributes NxDI model code reads from its attention layers (heads per rank, as NxDI)."""
    cfg = module.attn_config
    module.hidden_size = cfg.hidden_size
    module.num_attention_heads = cfg.num_attention_heads
    module.num_heads = module.layout.n_q  # this rank's q heads
    module.num_key_value_heads = module.layout.n_kv  # this rank's kv heads, as NxDI after init
    module.num_key_value_groups = max(module.layout.n_q // max(module.layout.n_kv, 1), 1)
    module.torch_dtype = dtype
    module.tp_degree = module.groups.tp_size
    module.cp_degree = module.groups.cp_size
    module.dp_degree = module.groups.dp_size
    module.sliding_window = cfg.sliding_window
    module.attention_chunk_size = cfg.attention_chunk_size
    module.learned_sinks_size = cfg.learned_sinks_size
    module.qkv_bias, module.o_bias = cfg.qkv_bias, cfg.o_bias
    module.clip_qkv = cfg.clip_qkv
    module.rms_norm_eps = cfg.rms_norm_eps
    module.fused_qkv = cfg.fused_qkv
    module.use_qk_norm = module.nxdi.use_qk_norm
    module.padding_side = getattr(module.neuron_config, "padding_side", "right")
