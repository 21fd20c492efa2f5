"""`distattn demo`: the built-in default. A tiny random checkpoint of one family, generated with 2 processes
(context-parallel prefill, data-parallel decode) and compared with HF generate."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

DEMO_FAMILIES = ("gpt-oss", "llama4", "gemma3", "llama")


def _demo_config(family: str) -> Any:
    """A tiny config of `family` (vocab 128, hidden 64, 4 / 2 heads) with the features the family is about."""
    import transformers

    common: dict[str, Any] = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=None, tie_word_embeddings=False)
    if family == "gpt-oss":  # sinks, alternating sliding-window (8) / full layers, YaRN, MoE (4 experts, top 2)
        return transformers.GptOssConfig(**common, num_hidden_layers=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                         sliding_window=8, rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                                            "truncate": False, "original_max_position_embeddings": 64,
                                                                            "rope_theta": 150000.0})
    if family == "llama4":  # chunked attention (8), NoPE layers, L2 QK-norm, MoE layers with a shared expert
        return transformers.Llama4TextConfig(**common, num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=128,
                                             num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=8,
                                             use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1,
                                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    if family == "gemma3":  # local sliding-window (8) and global layers, (1 + w) norms, GeGLU, scaled embeddings
        return transformers.Gemma3TextConfig(**common, num_hidden_layers=2, intermediate_size=128, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    return transformers.LlamaConfig(**common, num_hidden_layers=2, intermediate_size=128)


def demo_checkpoint(root: Path, family: str = "llama") -> Path:
    """A tiny deterministic random checkpoint of `family` (one of DEMO_FAMILIES), saved once with save_pretrained."""
    path = root / ("tiny-llama" if family == "llama" else f"tiny-{family}")
    if (path / "config.json").exists():
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_demo_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.5 if "embed" in name else 0.15)
    model.save_pretrained(path)
    return path


DEMO_PROMPTS = ["5,17,3,44,9,1,30,2", "7,7,21,90", "33,2,5,80,14,6", "4,50,9"]


def cmd_demo(args: argparse.Namespace) -> int:
    import torch
    import transformers

    checkpoint = demo_checkpoint(Path(args.cache_dir).expanduser(), args.family)
    print(f"checkpoint: {checkpoint} (tiny random {args.family}, made with save_pretrained)")
    command = [sys.executable, "-m", "distattn.cli", "generate", "--model", str(checkpoint), "--max-new-tokens", str(args.max_new_tokens),
               "--tp", "2", "--cp", "2", "--dp", "2", "--dtype", "float64", "--json", "--prompt-ids", *DEMO_PROMPTS]
    print("running: distattn generate --tp 2 --cp 2 --dp 2 (2 processes via torchrun: CP prefill, DP decode)")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
        return done.returncode
    report = json.loads(done.stdout.strip().splitlines()[-1])
    moe = {"experts_implementation": "eager"} if args.family in ("gpt-oss", "llama4") else {}  # HF's grouped experts take no fp64
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64, **moe).eval()
    ok = True
    for text, tokens in zip(DEMO_PROMPTS, report["tokens"]):
        prompt = [int(t) for t in text.split(",")]
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        ok &= tokens == expected
        print(f"{prompt} -> {tokens} {'== HF generate' if tokens == expected else '!= HF generate ' + str(expected)}")
    print(f"model: {report['model']}")
    print(f"time to first token {1e3 * report['time_to_first_token_s']:.1f} ms; steady state: prefill {report['prefill_tokens_per_s']:.0f} "
          f"tokens/s, decode {report['decode_tokens_per_s']:.0f} tokens/s (warm-up {1e3 * report['warmup_seconds']:.0f} ms, not counted)")
    print(f"parity with HF generate: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


