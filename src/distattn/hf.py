"""Hugging Face transformers interop: config -> AttentionConfig, weights -> our parameters.

Covers the families whose attention this package reproduces: Llama, Mistral,
Qwen2, Qwen3, gpt-oss, Llama 4 (text) and Gemma 3 (text). transformers itself is not imported
here; any object with the HF config attributes works.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import AttentionConfig, RopeConfig
from .safetensors_file import SafetensorsFile

# model_type -> (qkv_bias, o_bias) where the family hard-codes them instead of
# reading `attention_bias` for all four projections.
_FIXED_BIAS = {"qwen2": (True, False), "mistral": (False, False)}
_ROPE_KEYS = {
    "rope_theta": "theta",
    "factor": "factor",
    "partial_rotary_factor": "partial_rotary_factor",
    "original_max_position_embeddings": "original_max_position_embeddings",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "attention_factor": "attention_factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "truncate": "truncate",
}


def _text_config(hf_config: Any) -> Any:
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def _rope_config(cfg: Any, layer_type: str | None, interleaved: bool) -> RopeConfig:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):  # per-layer-type rope
        params = dict(params[layer_type])
    if "rope_theta" not in params and getattr(cfg, "rope_theta", None) is not None:
        params["rope_theta"] = cfg.rope_theta
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise ValueError(
            f"rope_parameters.rope_type={rope_type!r} is not supported; supported: default, linear, llama3, yarn"
        )
    if "partial_rotary_factor" not in params and getattr(cfg, "partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = cfg.partial_rotary_factor
    kwargs = {ours: params[theirs] for theirs, ours in _ROPE_KEYS.items() if params.get(theirs) is not None}
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in kwargs:
        kwargs["original_max_position_embeddings"] = cfg.max_position_embeddings
    return RopeConfig(rope_type=rope_type, interleaved=interleaved, **kwargs)


def attention_config_from_hf(hf_config: Any, layer_idx: int) -> AttentionConfig:
    """The AttentionConfig of layer `layer_idx` of an HF model config.

    Honours `layer_types` (sliding_attention / chunked_attention / full_attention),
    Mistral's global sliding window, Llama 4 chunked and NoPE layers with
    temperature tuning and its weightless QK-norm, Qwen3 QK-norm, gpt-oss sinks
    and attention bias, and `rope_parameters`.
    """
    cfg = _text_config(hf_config)
    n_layers = cfg.num_hidden_layers
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < n_layers:
        raise ValueError(f"layer_idx={layer_idx!r} is outside the model's {n_layers} layers")
    model_type = getattr(cfg, "model_type", "")
    layer_types = getattr(cfg, "layer_types", None)
    layer_type = layer_types[layer_idx] if layer_types else None
    sliding_window = None
    chunk = None
    if layer_type == "sliding_attention" or (layer_type is None and getattr(cfg, "sliding_window", None)):
        sliding_window = cfg.sliding_window
    elif layer_type == "chunked_attention":
        chunk = cfg.attention_chunk_size
    bias = bool(getattr(cfg, "attention_bias", False))
    qkv_bias, o_bias = _FIXED_BIAS.get(model_type, (bias, bias))
    is_llama4 = model_type.startswith("llama4")
    uses_rope = True
    if is_llama4:
        uses_rope = bool(cfg.no_rope_layers[layer_idx])  # 1 = RoPE, 0 = NoPE
    qk_norm: dict[str, Any] = {}
    if model_type.startswith("qwen3"):
        qk_norm = {"qk_norm": "rmsnorm"}
    elif model_type.startswith("gemma3"):
        qk_norm = {"qk_norm": "rmsnorm", "qk_norm_weight_offset": 1.0}  # Gemma's norms scale by (1 + weight)
    elif is_llama4 and getattr(cfg, "use_qk_norm", False) and uses_rope:
        qk_norm = {"qk_norm": "l2norm", "qk_norm_after_rope": True}
    temperature: dict[str, Any] = {}
    if is_llama4 and not uses_rope and getattr(cfg, "attn_temperature_tuning", False):
        temperature = {"attn_temperature_tuning": True, "floor_scale": float(cfg.floor_scale), "attn_scale": float(cfg.attn_scale)}
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    return AttentionConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        learned_sinks_size=1 if model_type == "gpt_oss" else None,
        sliding_window=sliding_window,
        attention_chunk_size=chunk,
        softmax_scale=scalar**-0.5 if scalar else None,
        rms_norm_eps=getattr(cfg, "rms_norm_eps", 1e-6),
        rope=_rope_config(cfg, layer_type, interleaved=is_llama4) if uses_rope else None,
        **qk_norm,
        **temperature,
    )


def hf_attention_shapes(config: AttentionConfig) -> dict[str, tuple[int, ...]]:
    """Names and full (unsharded) shapes of an HF attention module's tensors for `config`."""
    hidden, dim = config.hidden_size, config.head_dim
    q_width, kv_width = config.q_size, config.kv_size
    shapes: dict[str, tuple[int, ...]] = {
        "q_proj.weight": (q_width, hidden),
        "k_proj.weight": (kv_width, hidden),
        "v_proj.weight": (kv_width, hidden),
        "o_proj.weight": (hidden, q_width),
    }
    if config.qkv_bias:
        shapes.update({"q_proj.bias": (q_width,), "k_proj.bias": (kv_width,), "v_proj.bias": (kv_width,)})
    if config.o_bias:
        shapes["o_proj.bias"] = (hidden,)
    if config.has_sinks:
        shapes["sinks"] = (config.n_heads,)
    if config.qk_norm == "rmsnorm":
        shapes["q_norm.weight"] = (dim,)
        shapes["k_norm.weight"] = (dim,)
    return shapes


class StateDictSource:
    """Full tensors in memory, read whole or as slices (the same interface as CheckpointSource)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def shapes(self) -> dict[str, tuple[int, ...]]:
        bad = sorted(n for n, t in self.tensors.items() if not isinstance(t, torch.Tensor) or t.is_meta)
        if bad:
            raise TypeError(f"state_dict entries {bad[:4]} are not tensors with data (a list, None or a meta tensor); pass real tensors")
        return {name: tuple(t.shape) for name, t in self.tensors.items()}

    def dtypes(self) -> dict[str, str]:
        """Every tensor's dtype name (`torch.float32` -> "float32")."""
        return {name: str(t.dtype).replace("torch.", "") for name, t in self.tensors.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def int8_weights(self) -> list[str]:
        """Pre-quantized int8 weights: none in a state dict (it holds the float tensors)."""
        return []

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its [start, stop) slice along `dim`."""
        t = self.tensors[name]
        return t if start is None or stop is None else t.narrow(dim, start, stop - start)


def _weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's tensor -> file map from its index; ValueError naming the index file otherwise."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{str(index)!r} is not a safetensors index ({type(err).__name__}: {err}); it should be JSON with a "
                         "\"weight_map\" of tensor names to shard files: save the checkpoint again") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{str(index)!r}: \"weight_map\" must map tensor names to shard file names")
    return weight_map


class CheckpointSource:
    """Tensors of a safetensors checkpoint (sharded or not) under `prefix`, read lazily.

    `read` with a range reads only that slice from disk (`SafetensorsFile`: positioned
    reads, no memory map), so a tensor-parallel rank reads only its shard. `bytes_read`
    counts what was read. Each file is opened once and shared with the sources made by `sub`.
    """

    def __init__(self, checkpoint: str | Path, prefix: str = "", *, _shared: tuple[dict[str, str], dict[str, Any]] | None = None) -> None:
        root = Path(checkpoint)
        self.root, self.prefix = root, prefix
        if _shared is None:
            if not root.is_dir():
                raise ValueError(f"checkpoint={str(checkpoint)!r} is not a directory; pass the folder with config.json and *.safetensors")
            self._handles: dict[str, Any] = {}
            index = root / "model.safetensors.index.json"
            if index.exists():
                weight_map: dict[str, str] = _weight_map(index)
            else:
                files = sorted(root.glob("*.safetensors"))
                if not files:
                    raise ValueError(f"checkpoint {str(root)!r} has no *.safetensors file; save the model with save_pretrained(safe_serialization=True)")
                weight_map = {name: file.name for file in files for name in self._call(file.name, lambda h: list(h.keys()))}
        else:
            weight_map, self._handles = _shared
        self._weight_map = weight_map
        self.files = {name[len(prefix):]: weight_map[name] for name in weight_map if name.startswith(prefix)}
        if not self.files:
            raise ValueError(f"checkpoint {str(root)!r} has no tensors under {prefix!r}; check the layer index and prefix")
        self.bytes_read = 0
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._dtypes: dict[str, str] | None = None

    def sub(self, prefix: str) -> CheckpointSource:
        """The tensors under `self.prefix + prefix`, sharing this source's open files."""
        return CheckpointSource(self.root, self.prefix + prefix, _shared=(self._weight_map, self._handles))

    def _call(self, file: str, use: Any) -> Any:
        """use(file) on `file` (a `SafetensorsFile`, opened once); a truncated or corrupt file raises ValueError naming it."""
        path = self.root / file
        try:
            if file not in self._handles:
                self._handles[file] = SafetensorsFile(path)
            return use(self._handles[file])
        except OSError as err:
            raise ValueError(f"checkpoint file {str(path)!r} cannot be read ({err}); it is truncated or corrupt: save or copy it again") from err

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape (from the file headers; no data is read)."""
        if self._shapes is None:
            self._shapes = {n: self._call(f, lambda h, n=n: h.shape(self.prefix + n)) for n, f in self.files.items()}
        return self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes()[name]

    def dtypes(self) -> dict[str, str]:
        """Every tensor's dtype name as the file headers give it ("F32", "BF16", "I8", ...; no data is read; read once,
        as the float check and the pre-quantized weights both ask)."""
        if self._dtypes is None:
            self._dtypes = {n: self._call(f, lambda h, n=n: h.dtype_name(self.prefix + n)) for n, f in self.files.items()}
        return self._dtypes

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its [start, stop) slice along `dim` (only that slice is read)."""

        tensor = self._call(self.files[name], lambda h: h.read(self.prefix + name, dim, start, stop))
        self.bytes_read += tensor.numel() * tensor.element_size()
        scale_name = int8_scale_name(name)
        if tensor.dtype == torch.int8 and scale_name in self.files:  # a pre-quantized weight: code * its row's scale
            rows = self.read(scale_name, 0, start, stop) if start is not None and dim == 0 else self.read(scale_name)
            tensor = tensor.to(torch.float32) * rows.to(torch.float32).reshape(-1, 1)
        return tensor

    def int8_weights(self) -> list[str]:
        """Weights stored as per-row symmetric int8 codes with a `.scale` beside them (NxDI's quantized checkpoints)."""
        dtypes = self.dtypes()
        return sorted(n for n, d in dtypes.items() if d == "I8" and int8_scale_name(n) in dtypes)


def int8_scale_name(weight_name: str) -> str:
    """The name of a per-row int8 weight's scale tensor (`x.weight` -> `x.scale`, `[out]` or `[out, 1]`)."""
    return weight_name[: -len("weight")] + "scale" if weight_name.endswith(".weight") else weight_name + ".scale"


_FLOAT_NAMES = {"F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64"}


def check_float_tensors(source: Any, names: Any, what: str) -> None:
    """ValueError when any of `names` in `source` is not a floating-point tensor (an int8 / fp8 /
    packed-int4 tensor would be cast to float silently: a quantized checkpoint needs its scales)."""
    dtypes = source.dtypes()
    bad = sorted(f"{n}: {dtypes[n]}" for n in names if n in dtypes and dtypes[n] not in _FLOAT_NAMES)
    if bad:
        raise ValueError(f"{what} holds tensors that are not floating point: {bad[:4]}; distattn loads float16 / bfloat16 / "
                         "float32 / float64 weights (a quantized checkpoint's integers would be read as values, without their scales)")


def load_attention_weights(
    checkpoint: str | Path, layer_idx: int, *, prefix: str = "model.layers.{layer}.self_attn."
) -> dict[str, torch.Tensor]:
    """One layer's HF attention tensors from a checkpoint directory (safetensors, sharded or not).

    Returns the attention module's own state dict (names without `prefix`), ready for
    `NeuronAttentionBase.load_hf_state_dict`. Reads only that layer's tensors. Raises
    ValueError naming the file for a missing, truncated or corrupt checkpoint.
    (`CheckpointSource` + `NeuronAttentionBase.load_hf` read only a rank's shard.)
    """
    source = CheckpointSource(checkpoint, prefix.format(layer=layer_idx))
    return {name: source.read(name) for name in source.files}
