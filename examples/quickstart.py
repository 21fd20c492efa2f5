"""The built-in default job: one gpt-oss attention layer, prefill + decode, checked against HF.

Builds a tiny gpt-oss attention layer with random weights (no download), loads it
(learned sinks, qkv/o bias, YaRN RoPE, sliding window 8 on layer 0) into
`distattn.NeuronAttentionBase`, runs a batch of two prompts of different lengths
through prefill, 20 decode steps and a 4-token speculative step over a
KVCacheManager, and prints the largest difference from Hugging Face's own module.

    python examples/quickstart.py [--layer 0] [--kernel auto]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import distattn
from tiny_gpt_oss import hf_attention, hf_config, layer_config, run_steps

PROMPTS, STEPS, SPEC = (13, 9), 20, 4
TOLERANCE = 1e-4  # fp32 against HF's fp32 module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=0, help="0: sliding window 8, 1: full attention")
    parser.add_argument("--kernel", default="auto", help="auto, sdpa or reference")
    args = parser.parse_args()

    config = hf_config()
    reference = hf_attention(config, args.layer)
    rotary = transformers.models.gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding(config)
    cfg = layer_config(config, args.layer)
    ours = distattn.NeuronAttentionBase(cfg, kernel=args.kernel, layer_idx=args.layer)
    ours.load_hf_state_dict(reference.state_dict())
    print(f"layer {args.layer}: {cfg.num_attention_heads} q heads, {cfg.num_key_value_heads} kv heads, "
          f"window {cfg.sliding_window}, sinks {cfg.has_sinks}, rope {cfg.rope.rope_type}, kernel {args.kernel}")

    x = torch.randn(len(PROMPTS), max(PROMPTS) + STEPS + SPEC, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    cache = distattn.KVCacheManager(cfg, num_layers=2, max_batch_size=2, max_seq_len=64, speculation_width=SPEC)
    start = time.perf_counter()
    outputs = run_steps(ours, cache, x, PROMPTS, STEPS, SPEC)
    elapsed = time.perf_counter() - start

    worst = 0.0
    for row, got in enumerate(outputs):
        length = got.shape[0]
        pos = torch.arange(length).unsqueeze(0)
        keep = (pos.T >= pos) & (pos.T - pos < (cfg.sliding_window or length + 1))  # HF's additive mask
        mask = torch.zeros(1, 1, length, length).masked_fill(~keep, float("-inf"))
        with torch.no_grad():
            expected = reference(x[row : row + 1, :length], rotary(x, pos), mask)[0][0]
        worst = max(worst, (got - expected).abs().max().item())
    print(f"prefill {PROMPTS} + {STEPS} decode steps + {SPEC}-token speculation in {elapsed * 1e3:.1f} ms")
    print(f"max |distattn - HF| = {worst:.2e}  ({'OK' if worst <= TOLERANCE else 'MISMATCH'}: fp32 bound {TOLERANCE})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
