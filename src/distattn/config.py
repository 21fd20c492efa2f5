"""Configuration of one attention layer.

`AttentionConfig` is a frozen dataclass validated in `__post_init__`: a bad value
raises a `ValueError` that names the field and the fix, before any module or cache
is built from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

RopeType = Literal["default", "linear", "llama3", "yarn"]
QKNorm = Literal["rmsnorm", "l2norm"]


def _fail(name: str, value: object, fix: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {fix}")


def _check_positive_int(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(name, value, "pass a positive integer" + (" or None" if optional else ""))


def _check_real(name: str, value: object, *, positive: bool = False, optional: bool = False) -> None:
    """A finite real number (not a bool), > 0 when `positive`; None allowed when `optional`."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        _fail(name, value, f"pass a finite{' positive' if positive else ''} number" + (" or None" if optional else ""))


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings (HF `rope_parameters` in one place).

    The inverse frequencies are computed by `distattn.ops.rope.inv_freq_for`.
    """

    theta: float = 10000.0  # base wavelength (HF `rope_theta`)
    rope_type: RopeType = "default"  # frequency scaling: default / linear / llama3 / yarn
    factor: float = 1.0  # scaling factor for linear, llama3 and yarn
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated
    interleaved: bool = False  # False: rotate-half (HF); True: adjacent pairs (Llama 4, Meta)
    original_max_position_embeddings: int | None = None  # llama3 / yarn pretraining length
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: extrapolation boundary (rotations)
    beta_slow: float = 1.0  # yarn: interpolation boundary (rotations)
    attention_factor: float | None = None  # yarn: cos/sin multiplier; None infers it from factor
    mscale: float | None = None  # yarn (DeepSeek style attention_factor inference)
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: floor/ceil the correction range (gpt-oss uses False)

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3", "yarn"):
            _fail("rope.rope_type", self.rope_type, "use 'default', 'linear', 'llama3' or 'yarn'")
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not 0 < self.theta < math.inf:
            _fail("rope.theta", self.theta, "the RoPE base must be > 0")
        for name in ("factor", "partial_rotary_factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            _check_real(f"rope.{name}", getattr(self, name))
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            _check_real(f"rope.{name}", getattr(self, name), optional=True)
        if self.attention_factor is not None and self.attention_factor <= 0:
            _fail("rope.attention_factor", self.attention_factor, "the cos / sin multiplier must be > 0 (or None to infer it)")
        _check_positive_int("rope.original_max_position_embeddings", self.original_max_position_embeddings, optional=True)
        if not 0 < self.partial_rotary_factor <= 1:
            _fail("rope.partial_rotary_factor", self.partial_rotary_factor, "use a value in (0, 1]")
        if self.rope_type != "default" and not self.factor > 0:
            _fail("rope.factor", self.factor, f"rope_type={self.rope_type!r} needs a factor > 0")
        if self.rope_type in ("llama3", "yarn") and not self.original_max_position_embeddings:
            _fail(
                "rope.original_max_position_embeddings",
                self.original_max_position_embeddings,
                f"rope_type={self.rope_type!r} needs the pretraining context length",
            )
        if self.rope_type == "llama3":
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                _fail("rope.low_freq_factor", self.low_freq_factor,
                      f"llama3 needs 0 < low_freq_factor < high_freq_factor (= {self.high_freq_factor}); HF's defaults are 1 and 4")
        if self.rope_type == "yarn" and not self.beta_slow < self.beta_fast:
            _fail("rope.beta_slow", self.beta_slow, f"yarn needs beta_slow < beta_fast (= {self.beta_fast})")


@dataclass(frozen=True)
class AttentionConfig:
    """Everything that shapes one attention layer, validated on construction.

    Shapes: q heads project to `num_attention_heads * head_dim`, k and v to
    `num_key_value_heads * head_dim`; query head `h` reads kv head
    `h // (num_attention_heads // num_key_value_heads)`.
    """

    hidden_size: int  # model width: hidden_states is [batch, seq, hidden_size]
    num_attention_heads: int  # query heads
    num_key_value_heads: int = None  # type: ignore[assignment]  # kv heads (GQA); None is accepted: __post_init__ sets num_attention_heads
    head_dim: int = None  # type: ignore[assignment]  # None is accepted: __post_init__ sets hidden_size // num_attention_heads
    qkv_bias: bool = False  # bias on the q/k/v projections
    o_bias: bool = False  # bias on the output projection
    fused_qkv: bool = False  # one [q; k; v] projection instead of three
    learned_sinks_size: int | None = None  # None, or 1: one learned sink logit per query head
    sliding_window: int | None = None  # W: a query at p sees keys p-W < k <= p
    attention_chunk_size: int | None = None  # C: a query at p sees keys k <= p with k//C == p//C
    softmax_scale: float | None = None  # multiplier on q.k; None means head_dim ** -0.5
    qk_norm: QKNorm | None = None  # "rmsnorm": per-head RMSNorm with weight; "l2norm": weightless
    qk_norm_weight_offset: float = 0.0  # rmsnorm weight is (offset + w): 0 Qwen3, 1 Gemma3
    qk_norm_after_rope: bool = False  # False: norm then RoPE (Qwen3); True: RoPE then norm (Llama 4)
    clip_qkv: float | None = None  # clamp q, k, v projections to [-clip, clip]
    rms_norm_eps: float = 1e-6  # epsilon of the q/k norms
    rope: RopeConfig | None = field(default_factory=RopeConfig)  # None: no RoPE (NoPE layer)
    attn_temperature_tuning: bool = False  # Llama 4 NoPE layers: scale q by position
    floor_scale: float = 8192.0  # temperature tuning: log1p(floor((p+1)/floor_scale))
    attn_scale: float = 0.1  # temperature tuning: ... * attn_scale + 1

    def __post_init__(self) -> None:
        self._check_heads()
        self._check_routes_and_values()

    def _check_heads(self) -> None:
        """Head counts and head_dim (derived from hidden_size when None)."""
        _check_positive_int("hidden_size", self.hidden_size, optional=False)
        _check_positive_int("num_attention_heads", self.num_attention_heads, optional=False)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        _check_positive_int("num_key_value_heads", self.num_key_value_heads, optional=False)
        if self.num_attention_heads % self.num_key_value_heads:
            _fail(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of it",
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                _fail(
                    "head_dim",
                    None,
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); pass head_dim explicitly",
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _check_positive_int("head_dim", self.head_dim, optional=False)

    def _check_routes_and_values(self) -> None:
        """Sinks, window / chunk, scale, norms, RoPE and flags."""
        if self.learned_sinks_size is not None and self.learned_sinks_size != 1:
            raise ValueError(
                f"learned_sinks_size={self.learned_sinks_size!r} is invalid: "
                "Learned sinks only supports learned_sinks_size == 1 (or None for no sinks)"
            )
        _check_positive_int("sliding_window", self.sliding_window, optional=True)
        _check_positive_int("attention_chunk_size", self.attention_chunk_size, optional=True)
        if self.sliding_window is not None and self.attention_chunk_size is not None:
            _fail(
                "attention_chunk_size",
                self.attention_chunk_size,
                "a layer is either chunked or sliding-window; set sliding_window=None on chunked layers",
            )
        _check_real("softmax_scale", self.softmax_scale, positive=True, optional=True)
        if self.qk_norm not in (None, "rmsnorm", "l2norm"):
            _fail("qk_norm", self.qk_norm, "use None, 'rmsnorm' (with weight) or 'l2norm' (weightless)")
        _check_real("clip_qkv", self.clip_qkv, positive=True, optional=True)
        _check_real("rms_norm_eps", self.rms_norm_eps, positive=True)
        _check_real("qk_norm_weight_offset", self.qk_norm_weight_offset)
        _check_real("attn_scale", self.attn_scale)
        if self.rope is not None:
            if not isinstance(self.rope, RopeConfig):
                _fail("rope", self.rope, "pass a distattn.RopeConfig or None for a NoPE layer")
            if self.rotary_dim % 2:
                _fail(
                    "rope.partial_rotary_factor",
                    self.rope.partial_rotary_factor,
                    f"head_dim * factor = {self.rotary_dim} must be even",
                )
        if self.attn_temperature_tuning and self.rope is not None:
            _fail(
                "attn_temperature_tuning",
                True,
                "temperature tuning applies to NoPE layers only; set rope=None or turn it off",
            )
        _check_real("floor_scale", self.floor_scale, positive=True)
        for name in ("qkv_bias", "o_bias", "fused_qkv", "qk_norm_after_rope", "attn_temperature_tuning"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "pass True or False")

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def n_kv_groups(self) -> int:
        """Query heads per kv head."""
        return self.num_attention_heads // self.n_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        """The softmax multiplier applied to q.k."""
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim**-0.5

    @property
    def rotary_dim(self) -> int:
        """Leading channels of each head that RoPE rotates (0 for NoPE)."""
        if self.rope is None:
            return 0
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def has_sinks(self) -> bool:
        return self.learned_sinks_size == 1
