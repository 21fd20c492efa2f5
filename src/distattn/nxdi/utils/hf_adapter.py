"""`load_pretrained_config`: an HF checkpoint's config as the attributes of an InferenceConfig."""

from __future__ import annotations

import os
from typing import Any, Callable

from ..models.config import InferenceConfig, to_torch_dtype


def transformers4_rope_names(config: dict[str, Any]) -> dict[str, Any]:
    """The transformers 4 RoPE attributes NxDI model code reads, from transformers 5's `rope_parameters`.

    `rope_theta` and `rope_scaling` (None for unscaled RoPE); for configs with per-layer-type
    parameters (Gemma 3) the full-attention layers' values, with the sliding layers' base as
    `rope_local_base_freq`. Values already present are kept.
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    names: dict[str, Any] = {}
    if isinstance(params.get("full_attention"), dict) or isinstance(params.get("sliding_attention"), dict):
        local = params.get("sliding_attention") or {}
        params = params.get("full_attention") or local
        if "rope_theta" in local:
            names["rope_local_base_freq"] = local["rope_theta"]
    if "rope_theta" in params:
        names["rope_theta"] = params["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    names["rope_scaling"] = None if rope_type == "default" else dict(params, rope_type=rope_type)
    return {k: v for k, v in names.items() if config.get(k) is None}


def _config_dict(hf_config: Any) -> dict[str, Any]:
    d = dict(hf_config.to_dict())
    d.update(transformers4_rope_names(d))
    for key, value in list(d.items()):
        if isinstance(value, dict) and "model_type" in value and isinstance(value.get("rope_parameters"), dict):
            d[key] = {**value, **transformers4_rope_names(value)}  # nested text_config
    return d


def load_pretrained_config(model_path_or_name: str | os.PathLike | None = None, hf_config: Any = None) -> Callable[[InferenceConfig], None]:
    """A `load_config` hook for `InferenceConfig(neuron_config, load_config=...)`.

    Reads `config.json` from a local checkpoint directory (no download) or takes an
    already built HF `PretrainedConfig`, and sets every field on the InferenceConfig,
    plus transformers 4's `rope_theta` / `rope_scaling` where transformers 5 keeps
    `rope_parameters`. The checkpoint's dtype does not override `neuron_config.torch_dtype`.
    """
    if (model_path_or_name is None) == (hf_config is None):
        raise ValueError("load_pretrained_config needs exactly one of model_path_or_name (a checkpoint directory) and hf_config")

    def load_config(self: InferenceConfig) -> None:
        config = hf_config
        if config is None:
            from transformers import AutoConfig

            if model_path_or_name is None or not os.path.isdir(model_path_or_name):
                raise ValueError(f"model_path_or_name={str(model_path_or_name)!r} is not a directory with a config.json")
            config = AutoConfig.from_pretrained(model_path_or_name)
        values = _config_dict(config)
        for key in ("torch_dtype", "dtype"):
            dtype = values.pop(key, None)
            if dtype is not None and getattr(self.neuron_config, "overrides_torch_dtype", False):
                self.neuron_config.torch_dtype = to_torch_dtype(dtype)
        for key, value in values.items():
            setattr(self, key, value)
        self._name_or_path = str(model_path_or_name) if model_path_or_name is not None else getattr(config, "_name_or_path", "")

    return load_config


def __getattr__(name: str) -> object:
    from distattn.nxdi import missing_name

    raise missing_name(__name__, name)
