"""NxDI's `NeuronAttentionBase` constructor, translated once into distattn's settings.

`nxdi_layer(config, positional, keywords)` reads NxDI's keywords and the
`InferenceConfig` / `neuron_config` they come with and returns an `NxdiLayer`: the
`AttentionConfig`, process groups, dtype and the few behaviours that differ in the
NxDI form (per-call polar RoPE, norm modules, where `rmsnorm` / `residual` apply).
Everything is checked here, before the module builds a parameter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AttentionConfig, RopeConfig
from ..parallel.groups import ParallelGroups
from ..parallel.groups import global_ranks
from .form import NxdiForm, QKNormPlacement

logger = logging.getLogger("distattn.nxdi")


# NxDI keywords in the order NxDI's quick reference passes them positionally
POSITIONAL = ("hidden_size", "num_attention_heads", "num_key_value_heads")
# keyword -> default; these steer Neuron kernels or compiler layouts and change nothing here
NEURON_ONLY = {
    "num_cores_per_group": 1,  # flash decoding over Neuron cores
    "is_post_global_attn_layer": False,  # CP gather scheduling around global layers
    "is_pre_global_attn_layer": False,
    "optimize_interleave_attn": False,
    "o_proj_layer_name": "o_proj",  # checkpoint key naming inside NxDI's GQA module
    "rpl_reduce_dtype": None,  # dtype of the o_proj all-reduce on Neuron; here it runs in the activation dtype
    "post_transpose_layernorm": False,  # where NxDI applies q/k_layernorm (same per-head result either way)
}
# neuron_config switches that only select Neuron kernels
NEURON_ONLY_FLAGS = (
    "flash_decoding_enabled", "attn_kernel_enabled", "attn_tkg_nki_kernel_enabled", "attn_tkg_builtin_kernel_enabled",
    "attn_block_tkg_nki_kernel_enabled", "attn_block_cte_nki_kernel_enabled", "qkv_nki_kernel_enabled",
    "k_cache_transposed", "rpl_reduce_dtype", "strided_context_parallel_kernel_enabled",
)
KEYWORDS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rotary_emb", "rope_theta", "use_scaled_rope",
    "rms_norm_eps", "use_qk_norm", "qk_norm_placement", "q_layernorm", "k_layernorm", "clip_qkv", "qkv_bias", "o_bias",
    "softmax_scale", "sequence_parallel_enabled", "attention_chunk_size", "sliding_window", "tensor_model_parallel_group",
    "learned_sinks_size", *NEURON_ONLY,
)
# Meta's Llama 3.1 RoPE scaling, used by `use_scaled_rope` when the config has no rope_scaling
_META_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_logged: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class NxdiLayer:
    """One NxDI-form layer's settings."""

    attn_config: AttentionConfig
    groups: ParallelGroups
    dtype: torch.dtype
    rotary_emb: Any  # the model's rotary module, or None
    q_layernorm: Any  # per-head norm modules applied before RoPE, or None
    k_layernorm: Any
    form: NxdiForm  # what the forward does differently in the NxDI form


def nxdi_layer(config: Any, positional: tuple[Any, ...], keywords: dict[str, Any], *, groups: ParallelGroups | None, dtype: torch.dtype | None) -> NxdiLayer:
    """Translate NxDI's constructor arguments; TypeError / ValueError naming the argument otherwise."""
    neuron_config = getattr(config, "neuron_config", None)
    if neuron_config is None:
        raise TypeError(
            f"config must be a distattn.AttentionConfig or an NxDI-style InferenceConfig with a neuron_config "
            f"(distattn.nxdi.models.config.InferenceConfig), got {type(config).__name__}"
        )
    kw = _keywords(positional, keywords)
    _log_neuron_only(kw, neuron_config)
    q_layernorm, k_layernorm = kw.get("q_layernorm"), kw.get("k_layernorm")
    if (q_layernorm is None) != (k_layernorm is None):
        raise ValueError("q_layernorm and k_layernorm must both be set or both be None")
    placement = kw.get("qk_norm_placement", QKNormPlacement.PRE_ROPE)
    if not isinstance(placement, QKNormPlacement):
        raise ValueError(f"qk_norm_placement={placement!r} is invalid: use QKNormPlacement.PRE_ROPE or POST_ROPE")
    use_qk_norm = bool(kw.get("use_qk_norm", False))
    if use_qk_norm and placement is QKNormPlacement.PRE_ROPE:
        raise ValueError(
            "use_qk_norm with qk_norm_placement=PRE_ROPE normalises each rank's whole q projection in NxDI "
            "(a result that depends on the TP degree); use QKNormPlacement.POST_ROPE, or per-head "
            "q_layernorm / k_layernorm modules for a norm before RoPE"
        )
    if neuron_config.sequence_parallel_enabled if kw.get("sequence_parallel_enabled") is None else kw["sequence_parallel_enabled"]:
        raise ValueError(
            "sequence_parallel_enabled=True (NxDI's hidden states split along the sequence over the TP group) is not "
            "supported; set neuron_config.sequence_parallel_enabled=False (for long prompts use cp_degree: "
            "context-parallel prefill splits the prompt across ranks)"
        )
    polar = kw.get("rotary_emb") is None and kw.get("rope_theta") is not None
    return NxdiLayer(
        attn_config=_attention_config(config, neuron_config, kw, polar),
        groups=groups if groups is not None else _groups(neuron_config, kw.get("tensor_model_parallel_group")),
        dtype=dtype or getattr(neuron_config, "attention_dtype", None) or neuron_config.torch_dtype,
        rotary_emb=kw.get("rotary_emb"),
        q_layernorm=q_layernorm,
        k_layernorm=k_layernorm,
        form=NxdiForm(polar_rope=polar, use_qk_norm=use_qk_norm, qk_norm_after_rope=placement is QKNormPlacement.POST_ROPE,
                      fuse_norm=bool(neuron_config.qkv_kernel_enabled)),
    )


def _keywords(positional: tuple[Any, ...], keywords: dict[str, Any]) -> dict[str, Any]:
    """NxDI's positional and keyword arguments as one dict, checked against NxDI's names."""
    if len(positional) > len(POSITIONAL):
        raise TypeError(f"NeuronAttentionBase takes at most {len(POSITIONAL)} positional arguments after config ({', '.join(POSITIONAL)}); pass the rest by keyword")
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        raise TypeError(f"NeuronAttentionBase got unexpected keyword arguments {unknown}; NxDI's keywords: {', '.join(KEYWORDS)}")
    kw = dict(zip(POSITIONAL, positional))
    for name in kw:
        if name in keywords:
            raise TypeError(f"NeuronAttentionBase got {name} both by position and by keyword")
    kw.update(keywords)
    for name in ("hidden_size", "num_attention_heads"):
        if kw.get(name) is None:
            raise TypeError(f"NeuronAttentionBase needs {name}= (NxDI form: config plus keyword arguments)")
    return kw


def _attention_config(config: Any, neuron_config: Any, kw: dict[str, Any], polar: bool) -> AttentionConfig:
    """The layer's AttentionConfig from NxDI's keywords (softmax_scale: NxDI divides by it, we multiply)."""
    if polar:
        rope: RopeConfig | None = _polar_rope(config, float(kw["rope_theta"]), bool(kw.get("use_scaled_rope", False)))
    else:
        rope = RopeConfig() if kw.get("rotary_emb") is not None else None  # tables come from the module
    softmax_scale = kw.get("softmax_scale")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"softmax_scale={softmax_scale!r} is invalid: NxDI divides q.k by it; pass a positive value or None")
    rms_norm_eps = kw.get("rms_norm_eps")
    return AttentionConfig(
        hidden_size=kw["hidden_size"],
        num_attention_heads=kw["num_attention_heads"],
        **{name: kw[name] for name in ("num_key_value_heads", "head_dim") if kw.get(name) is not None},  # else derived
        qkv_bias=bool(kw.get("qkv_bias", False)),
        o_bias=bool(kw.get("o_bias", False)),
        fused_qkv=bool(neuron_config.fused_qkv),
        learned_sinks_size=kw.get("learned_sinks_size"),
        sliding_window=kw.get("sliding_window") or None,
        attention_chunk_size=kw.get("attention_chunk_size") or None,
        softmax_scale=None if softmax_scale is None else 1.0 / softmax_scale,
        clip_qkv=kw.get("clip_qkv"),
        rms_norm_eps=1e-6 if rms_norm_eps is None else rms_norm_eps,
        rope=rope,
    )


def _polar_rope(config: Any, theta: float, scaled: bool) -> RopeConfig:
    """NxDI's polar-compatible RoPE (Meta's interleaved pairs), llama3-scaled with use_scaled_rope."""
    if not scaled:
        return RopeConfig(theta=theta, interleaved=True)
    scaling = getattr(config, "rope_scaling", None)
    params: dict[str, Any] = dict(_META_SCALING)
    if isinstance(scaling, dict):
        params.update({k: scaling[k] for k in _META_SCALING if scaling.get(k) is not None})
    return RopeConfig(theta=theta, rope_type="llama3", interleaved=True, factor=float(params["factor"]),
                      low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
                      original_max_position_embeddings=int(params["original_max_position_embeddings"]))


def _groups(neuron_config: Any, tp_group: Any) -> ParallelGroups:
    """The layer's process groups: given, or built once per process from the neuron_config degrees."""
    tp, cp, dp = neuron_config.tp_degree, neuron_config.cp_degree, neuron_config.attention_dp_degree
    for name, degree in (("tp_degree", tp), ("cp_degree", cp), ("attention_dp_degree", dp)):
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"neuron_config.{name}={degree!r} is invalid: pass a positive integer (1 without that parallelism)")
    if isinstance(tp_group, ParallelGroups):
        return tp_group
    if tp == 1 and cp == 1 and dp == 1 and tp_group is None:
        return ParallelGroups()
    groups = ParallelGroups.shared(tp, cp_degree=cp, dp_degree=dp)
    if tp_group is not None and global_ranks(tp_group) != groups.tp_global_ranks:
        raise ValueError(
            "tensor_model_parallel_group holds other ranks than the tp_degree block this rank belongs to; pass "
            "groups=distattn.parallel.ParallelGroups(...) for a custom layout"
        )
    return groups


def _log_neuron_only(kw: dict[str, Any], neuron_config: Any) -> None:
    """List, once per process and set, the keywords and switches that have no effect off Neuron."""
    names = [f"{n}={kw[n]!r}" for n, default in NEURON_ONLY.items() if n in kw and kw[n] != default]
    names += [f"neuron_config.{f}={getattr(neuron_config, f)!r}" for f in NEURON_ONLY_FLAGS if getattr(neuron_config, f, None)]
    key = tuple(names)
    if names and key not in _logged:
        _logged.add(key)
        logger.warning("NeuronAttentionBase: these NxDI settings steer Neuron kernels and have no effect here: %s", ", ".join(names))

