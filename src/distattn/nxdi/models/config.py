"""NxDI's config objects: `NeuronConfig`, `MoENeuronConfig`, `InferenceConfig`.

Model code written for NxDI builds its layers from an `InferenceConfig` (the HF model
config's attributes plus a `neuron_config`). These classes keep NxDI's constructor
keywords, attribute maps and hooks (`load_config`, `add_derived_config`,
`get_required_attributes`, `validate_config`) so that such code runs unchanged; the
fields that say how a layer is laid out (`tp_degree`, `cp_degree`,
`attention_dp_degree`, `torch_dtype`, `fused_qkv`, ...) are read by
`distattn.NeuronAttentionBase`. Fields that only steer Neuron kernels are kept as
given and have no effect here (the layer lists the ones set, once, in a log line).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

CONFIG_FILE = "neuron_config.json"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_torch_dtype(dtype_str: str | torch.dtype) -> torch.dtype:
    """"bfloat16" / "torch.bfloat16" / torch.bfloat16 -> torch.bfloat16; ValueError naming the supported ones."""
    name = str(dtype_str).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"torch_dtype={dtype_str!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def to_dict(obj: Any) -> Any:
    """A JSON-ready copy of a config: objects become dicts of their attributes, dtypes their names."""
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).split(".")[1]
    if callable(obj) and not hasattr(obj, "__dict__"):
        return None
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return {k: to_dict(v) for k, v in vars(obj).items() if not callable(v) or hasattr(v, "__dict__")}
    return obj


class NeuronConfig:
    """How a model is laid out and run: NxDI's `NeuronConfig` keywords, with its defaults.

    The fields distattn reads: `tp_degree`, `cp_degree`, `attention_dp_degree`,
    `sequence_parallel_enabled`, `torch_dtype` / `attention_dtype`, `fused_qkv`,
    `qkv_kernel_enabled` (whether `rmsnorm` / `residual` reach the QKV step), `seq_len`,
    `batch_size`, `max_batch_size`, `padding_side`. Any other keyword is stored as given.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.batch_size: int = kwargs.pop("batch_size", 1)
        self.padding_side: str = kwargs.pop("padding_side", "right")
        self.seq_len: int = kwargs.pop("seq_len", 128)
        self.n_active_tokens: int = kwargs.pop("n_active_tokens", self.seq_len)
        self.n_positions: int = kwargs.pop("n_positions", self.seq_len)
        self.max_context_length: int = kwargs.pop("max_context_length", self.seq_len)
        self.max_length: int = kwargs.pop("max_length", self.seq_len)
        self.torch_dtype: torch.dtype = to_torch_dtype(kwargs.pop("torch_dtype", torch.bfloat16))
        attention_dtype = kwargs.pop("attention_dtype", None)
        self.attention_dtype: torch.dtype | None = None if attention_dtype is None else to_torch_dtype(attention_dtype)
        self.rpl_reduce_dtype: torch.dtype | None = kwargs.pop("rpl_reduce_dtype", None)
        self.fused_qkv: bool = kwargs.pop("fused_qkv", False)
        self.ctx_batch_size: int = kwargs.pop("ctx_batch_size", self.batch_size)
        self.tkg_batch_size: int = kwargs.pop("tkg_batch_size", self.batch_size)
        self.max_batch_size: int = kwargs.pop("max_batch_size", self.batch_size)
        self.is_continuous_batching: bool = kwargs.pop("is_continuous_batching", False)
        self.speculation_length: int = kwargs.pop("speculation_length", 0)
        self.enable_fused_speculation: bool = kwargs.pop("enable_fused_speculation", False)
        self.is_medusa: bool = kwargs.pop("is_medusa", False)
        self.is_eagle_draft: bool = kwargs.pop("is_eagle_draft", False)
        self.is_eagle3: bool = kwargs.pop("is_eagle3", False)
        self.is_prefill_stage: bool | None = kwargs.pop("is_prefill_stage", None)
        self.tp_degree: int = kwargs.pop("tp_degree", 1)
        self.cp_degree: int = kwargs.pop("cp_degree", 1)
        self.attention_dp_degree: int = kwargs.pop("attention_dp_degree", 1)
        self.pp_degree: int = kwargs.pop("pp_degree", 1)
        self.ep_degree: int = kwargs.pop("ep_degree", 1)
        self.world_size: int = kwargs.pop("world_size", None) or self.tp_degree * self.pp_degree * self.ep_degree
        self.sequence_parallel_enabled: bool = kwargs.pop("sequence_parallel_enabled", False)
        self.qkv_kernel_enabled: bool = kwargs.pop("qkv_kernel_enabled", False)
        self.mlp_kernel_enabled: bool = kwargs.pop("mlp_kernel_enabled", False)
        self.attn_kernel_enabled: bool | None = kwargs.pop("attn_kernel_enabled", None)
        self.flash_decoding_enabled: bool = kwargs.pop("flash_decoding_enabled", False)
        self.logical_nc_config: int = kwargs.pop("logical_nc_config", 1)
        self.lora_config: Any = kwargs.pop("lora_config", None)
        self.quantized: bool = kwargs.pop("quantized", False)
        self.on_device_sampling_config: Any = kwargs.pop("on_device_sampling_config", None)
        self.on_cpu: bool = kwargs.pop("on_cpu", True)
        self.__dict__.update(kwargs)  # the many Neuron-only switches, kept as given

    def __getattr__(self, name: str) -> Any:
        # NxDI's NeuronConfig defines ~150 kernel and compiler switches that default to
        # off; model code reads them (e.g. `neuron_config.qk_layernorm`). Unset ones read
        # as None (off) instead of raising, as they do on NxDI.
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class MoENeuronConfig(NeuronConfig):
    """NxDI's `MoENeuronConfig`: a NeuronConfig with the mixture-of-experts keywords."""

    def __init__(self, capacity_factor: float | None = None, glu_mlp: bool = True, **kwargs: Any) -> None:
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.glu_mlp = glu_mlp
        super().__init__(**kwargs)


class InferenceConfig:
    """A model's config for NxDI-style model code: HF attributes + `neuron_config`.

    `InferenceConfig(neuron_config, load_config=load_pretrained_config(path), **overrides)`
    reads the HF config (see `distattn.nxdi.utils.hf_adapter.load_pretrained_config`),
    applies the keyword overrides, then calls `add_derived_config()` and
    `validate_config()`, which checks `get_required_attributes()`. `attribute_map`
    aliases names (`attribute_map = {"n_heads": "num_attention_heads"}`).
    """

    attribute_map: dict[str, str] = {}

    def __init__(
        self,
        neuron_config: NeuronConfig,
        fused_spec_config: Any = None,
        load_config: Callable[[InferenceConfig], None] | None = None,
        metadata: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(neuron_config, NeuronConfig) and not hasattr(neuron_config, "tp_degree"):
            raise TypeError(
                f"neuron_config must be a distattn.nxdi.models.config.NeuronConfig, got {type(neuron_config).__name__}"
            )
        self.neuron_config = neuron_config
        self.fused_spec_config = fused_spec_config
        if load_config is not None:
            load_config(self)
        else:
            self.load_config()
        self.metadata = metadata
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.add_derived_config()
        self.validate_config()

    def __setattr__(self, key: str, value: Any) -> None:
        super().__setattr__(type(self).attribute_map.get(key, key), value)

    def __getattribute__(self, key: str) -> Any:
        if key != "attribute_map":
            key = type(self).attribute_map.get(key, key)
        return super().__getattribute__(key)

    def load_config(self) -> None:
        """Set the model's attributes (override, or pass `load_config=`); nothing by default."""

    def add_derived_config(self) -> None:
        """Set attributes derived from the loaded ones (override in a model's config). As NxDI's base:
        `num_cores_per_group = 1` (flash decoding's core groups; model code reads it)."""
        self.num_cores_per_group = 1

    def get_required_attributes(self) -> list[str]:
        """Attributes that must be present (dotted paths allowed) for validate_config to pass."""
        return []

    def validate_config(self) -> None:
        """ValueError listing the required attributes this config lacks."""
        missing = [name for name in self.get_required_attributes() if not _has_path(self, name)]
        if missing:
            raise ValueError(f"Config must define {missing}: pass them as keyword arguments or load them with load_config=")

    def get_text_config(self) -> InferenceConfig:
        """The text model's config (`text_config` when present, else this config)."""
        text = self.__dict__.get("text_config")
        return text if isinstance(text, InferenceConfig) else self

    def to_json_string(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)

    def save(self, model_path: str | os.PathLike) -> None:
        """Write `neuron_config.json` into model_path."""
        os.makedirs(model_path, exist_ok=True)
        with open(os.path.join(model_path, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(self.to_json_string() + "\n")

    @classmethod
    def load(cls, model_path: str | os.PathLike, **kwargs: Any) -> InferenceConfig:
        """Read a config saved with `save`; kwargs override its values."""
        with open(os.path.join(model_path, CONFIG_FILE), encoding="utf-8") as f:
            merged = json.loads(f.read())
        merged.update(kwargs)
        if isinstance(merged.get("neuron_config"), dict):
            merged["neuron_config"] = cls.get_neuron_config_cls()(**merged["neuron_config"])
        return cls(**merged)

    @classmethod
    def get_neuron_config_cls(cls) -> type[NeuronConfig]:
        return NeuronConfig


def _has_path(obj: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if isinstance(obj, dict):
            if part not in obj:
                return False
            obj = obj[part]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            return False
    return True


def __getattr__(name: str) -> object:
    from distattn.nxdi import missing_name

    raise missing_name(__name__, name)
