"""Checkpoint checks for `DecoderLM.from_pretrained`: what a config's checkpoint must hold, read from the
file headers before anything is built; and each family's norms."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from ..hf import CheckpointSource, attention_config_from_hf, check_float_tensors, hf_attention_shapes, int8_scale_name
from .mlp import RMSNorm
from .moe import gpt_oss_expected, llama4_expected

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt_oss", "gemma3_text", "llama4_text")


def is_gemma(hf_config: Any) -> bool:
    return hf_config.model_type.startswith("gemma3")


def layer_norm_names(hf_config: Any) -> list[str]:
    """The checkpoint names of one layer's norms (Gemma 3 has four)."""
    extra = ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if is_gemma(hf_config) else []
    return ["input_layernorm", "post_attention_layernorm", *extra]


def family_norm(hf_config: Any, dtype: torch.dtype) -> RMSNorm:
    """The family's RMSNorm over the hidden size."""
    gemma, gpt_oss = is_gemma(hf_config), hf_config.model_type == "gpt_oss"
    return RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps, dtype, offset=1.0 if gemma else 0.0, scale_in_float=gemma or gpt_oss)


def expected_shapes(hf_config: Any, names: Collection[str] = frozenset()) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `hf_config` must hold, with its shape (lm_head only when untied;
    `names`: the checkpoint's, where a family stores a tensor one way or another, e.g. MXFP4 experts)."""
    hidden, inter, vocab = hf_config.hidden_size, hf_config.intermediate_size, hf_config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not getattr(hf_config, "tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    norms = layer_norm_names(hf_config)
    for i in range(hf_config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        shapes.update({f"{prefix}{n}.weight": (hidden,) for n in norms})
        if hf_config.model_type == "gpt_oss":
            shapes.update(gpt_oss_expected(hf_config, prefix, names))
        elif hf_config.model_type == "llama4_text" and i in hf_config.moe_layers:
            shapes.update(llama4_expected(hf_config, prefix))
        elif hf_config.model_type == "llama4_text":
            dense = hf_config.intermediate_size_mlp
            shapes.update({prefix + "feed_forward.gate_proj.weight": (dense, hidden), prefix + "feed_forward.up_proj.weight": (dense, hidden),
                           prefix + "feed_forward.down_proj.weight": (hidden, dense)})
        else:
            shapes.update({prefix + "mlp.gate_proj.weight": (inter, hidden), prefix + "mlp.up_proj.weight": (inter, hidden),
                           prefix + "mlp.down_proj.weight": (hidden, inter)})
        shapes.update({prefix + "self_attn." + n: tuple(s) for n, s in hf_attention_shapes(attention_config_from_hf(hf_config, i)).items()})
    return shapes


def check_checkpoint(source: CheckpointSource, hf_config: Any) -> None:
    """ValueError listing tensors the config needs that the checkpoint lacks or holds in another shape
    or a non-float dtype (from the file headers: nothing is built or read yet)."""
    shapes = source.shapes()
    expected = expected_shapes(hf_config, set(shapes))
    missing = sorted(n for n in expected if n not in shapes)
    bad = sorted(f"{n}: {list(shapes[n])}, config needs {list(s)}" for n, s in expected.items() if n in shapes and tuple(shapes[n]) != s)
    if missing or bad:
        layers = {int(n.split(".")[2]) for n in shapes if n.startswith("model.layers.")}
        raise ValueError(
            f"checkpoint {str(source.root)!r} does not match its config.json ({hf_config.num_hidden_layers} layers, vocab "
            f"{hf_config.vocab_size}, hidden {hf_config.hidden_size}, intermediate {hf_config.intermediate_size}; the files hold "
            f"{len(layers)} layers): missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, mis-shaped {bad[:4]}"
        )
    method = (getattr(hf_config, "quantization_config", None) or {}).get("quant_method")
    if method not in (None, "mxfp4"):
        raise ValueError(f"checkpoint {str(source.root)!r} is quantized with quant_method={method!r} (config.json's quantization_config), "
                         f"which distattn does not read; it loads float weights, NxDI's per-row int8 weights (int8 `.weight` + "
                         f"`.scale`) and gpt-oss's MXFP4 experts: use the unquantized checkpoint and quantize='int8' / 'int4'")
    prequantized = set(source.int8_weights())
    odd = sorted(f"{int8_scale_name(n)}: {list(shapes[int8_scale_name(n)])}" for n in prequantized
                 if tuple(shapes[int8_scale_name(n)]) not in ((shapes[n][0],), (shapes[n][0], 1)))
    if odd:
        raise ValueError(f"checkpoint {str(source.root)!r}: int8 weights need one scale per row ([out] or [out, 1]); got {odd[:4]} "
                         "(per-tensor or grouped int8 checkpoints are not read: use the float checkpoint and quantize='int8')")
    check_float_tensors(source, [n for n in expected if not n.endswith(("_blocks", "_scales")) and n not in prequantized],
                        f"checkpoint {str(source.root)!r}")
