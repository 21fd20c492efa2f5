"""Multi-LoRA on the attention projections: PEFT adapters, their per-layer weights, the batched delta.

An adapter adds `scale * B A x` to a projection `W x` (A `[r, in]`, B `[out, r]`,
scale = alpha / r, or alpha / sqrt(r) with rsLoRA). Several adapters are loaded at
once; `adapter_ids` `[batch]` picks one per sequence (index into the loaded list, -1
for the base model), so rows with different adapters share one forward call.

Adapters come from the PEFT format users already have: a directory with
`adapter_config.json` and `adapter_model.safetensors` (`LoraAdapter.from_pretrained`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper around the HF model
LAYER_PREFIX = "model.layers.{layer}.self_attn."
_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.lora_([AB])\.weight")


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
    """Each row's adapter applied to x.

    Args:
        x: `[B, S, in]`.
        lora_a: `[N + 1, r, in]` stacked A of N adapters; slot N is zeros (no adapter).
        lora_b: `[N + 1, out, r]` stacked B with the scale folded in.
        adapter_ids: `[B]` in [-1, N); -1 selects slot N.

    Returns: `[B, S, out]` = scale_b * x_b A_b^T B_b^T per row b.
    """
    slots = torch.where(adapter_ids < 0, lora_a.shape[0] - 1, adapter_ids)
    return torch.matmul(torch.matmul(x, lora_a[slots].transpose(1, 2)), lora_b[slots].transpose(1, 2))


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's tensors for one attention layer.

    `source` holds `{q,k,v,o}_proj.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`
    for the projections it adapts (a `distattn.hf.StateDictSource` or `CheckpointSource`,
    so a tensor-parallel rank reads only its slices), or None for a layer the adapter
    leaves alone. `scale` multiplies B A.
    """

    source: Any
    scale: float
    name: str = "adapter"

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], scale: float, name: str = "adapter") -> LoraWeights:
        """From `{"q_proj.lora_A.weight": A, "q_proj.lora_B.weight": B, ...}` in memory."""
        from ..hf import StateDictSource

        return cls(StateDictSource(dict(tensors)) if tensors else None, scale, name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """`{name: shape}` of this adapter's tensors in the layer (empty when it leaves the layer alone)."""
        return {} if self.source is None else self.source.shapes()

    @property
    def rank(self) -> int:
        """r: rows of any lora_A (0 when the layer is not adapted)."""
        ranks = {shape[0] for name, shape in self.shapes().items() if name.endswith("lora_A.weight")}
        return max(ranks, default=0)


class LoraAdapter:
    """A PEFT LoRA adapter directory: `adapter_config.json` + `adapter_model.safetensors`.

    Supported: LoRA on q_proj / k_proj / v_proj / o_proj of the attention layers, any
    rank and alpha, rsLoRA, `layers_to_transform`. Refused with a clear error: DoRA,
    trained biases, fan_in_fan_out, per-module rank or alpha patterns, and adapters on
    other modules (their effect would otherwise be silently lost).
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        from ..hf import CheckpointSource

        root = Path(path)
        config_file = root / "adapter_config.json"
        if not config_file.exists():
            raise ValueError(f"adapter {str(root)!r} has no adapter_config.json; pass a directory saved by PEFT's save_pretrained")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"adapter {str(root)!r}: adapter_config.json is not valid JSON ({err}); save the adapter again") from err
        if not isinstance(config, dict):
            raise ValueError(f"adapter {str(root)!r}: adapter_config.json must hold a JSON object")
        self.path, self.name = root, name or root.name
        _check_peft_config(config, root)
        self.rank: int = int(config["r"])
        alpha = config.get("lora_alpha", self.rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"adapter {str(root)!r}: lora_alpha={alpha!r} must be a finite number")
        self.alpha: float = float(alpha)
        self.scale = self.alpha / (math.sqrt(self.rank) if config.get("use_rslora") else self.rank)
        if not (root / "adapter_model.safetensors").exists():
            raise ValueError(f"adapter {str(root)!r} has no adapter_model.safetensors; save it with safe_serialization=True")
        self.source = CheckpointSource(root, PEFT_PREFIX)
        other = sorted(n for n in self.source.files if not _KEY.fullmatch(n))
        if other:
            raise ValueError(
                f"adapter {str(root)!r} adapts modules distattn does not apply LoRA to: {other[:4]}"
                f"{' ...' if len(other) > 4 else ''}; only the attention q_proj/k_proj/v_proj/o_proj are supported"
            )
        self.layers = sorted({int(match.group(1)) for match in map(_KEY.fullmatch, self.source.files) if match is not None})
        shapes = self.source.shapes()
        ranks = sorted({shapes[n][0] for n in shapes if n.endswith("lora_A.weight")} | {shapes[n][-1] for n in shapes if n.endswith("lora_B.weight")})
        if ranks != [self.rank]:
            raise ValueError(f"adapter {str(root)!r}: adapter_config.json says r={self.rank} but its tensors have rank {ranks}; "
                             "the scale lora_alpha / r would be wrong: save the adapter again")
        from ..hf import check_float_tensors

        check_float_tensors(self.source, shapes, f"adapter {str(root)!r}")

    @classmethod
    def from_pretrained(cls, path: str | Path, name: str | None = None) -> LoraAdapter:
        """The adapter saved by PEFT's `save_pretrained` in directory `path` (same as `LoraAdapter(path)`)."""
        return cls(path, name)

    def layer(self, idx: int, prefix: str = LAYER_PREFIX) -> LoraWeights:
        """This adapter's weights for attention layer `idx` (names without the prefix)."""
        if idx not in self.layers:
            return LoraWeights(None, self.scale, self.name)
        return LoraWeights(self.source.sub(prefix.format(layer=idx)), self.scale, self.name)


def _check_peft_config(config: dict[str, Any], root: Path) -> None:
    refused = {
        "peft_type": (config.get("peft_type", "LORA") != "LORA", "only LoRA adapters are supported"),
        "use_dora": (bool(config.get("use_dora")), "DoRA is not supported"),
        "bias": (config.get("bias", "none") != "none", "trained biases are not supported; train with bias='none'"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D layers) is not supported"),
        "rank_pattern": (bool(config.get("rank_pattern")), "per-module ranks are not supported"),
        "alpha_pattern": (bool(config.get("alpha_pattern")), "per-module alphas are not supported"),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise ValueError(f"adapter {str(root)!r}: {key}={config.get(key)!r}: {why}")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise ValueError(f"adapter {str(root)!r}: r={config.get('r')!r} must be a positive integer")


def check_lora_fits(adapter: LoraWeights, hf_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError naming the adapter and its tensors when they do not fit a layer of `hf_shapes`
    (unknown names, A without B, shapes other than A `[r, in]`, B `[out, r]`)."""
    shapes = adapter.shapes()
    expected = lora_shapes(hf_shapes, adapter.rank)
    unknown = sorted(set(shapes) - set(expected))
    partner = {n: n.replace("lora_A", "lora_B") if "lora_A" in n else n.replace("lora_B", "lora_A") for n in shapes}
    unpaired = sorted(n for n in shapes if partner[n] not in shapes)
    bad = [f"{n}: {list(shapes[n])} vs {list(expected[n])}" for n in shapes if n in expected and tuple(shapes[n]) != expected[n]]
    if unknown or unpaired or bad:
        raise ValueError(
            f"LoRA adapter {adapter.name!r} does not fit this layer: unexpected {unknown}, "
            f"A without B (or B without A) {unpaired}, mis-shaped {bad} (A is [r, in], B is [out, r])"
        )


def lora_shapes(hf_shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, int]]:
    """Expected `{proj}.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]` for an attention layer,
    from its HF weight shapes (`distattn.hf.hf_attention_shapes`)."""
    shapes = {}
    for proj in PROJECTIONS:
        out, width = hf_shapes[f"{proj}.weight"]
        shapes[f"{proj}.lora_A.weight"] = (rank, width)
        shapes[f"{proj}.lora_B.weight"] = (out, rank)
    return shapes
