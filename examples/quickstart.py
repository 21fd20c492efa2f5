"""The built-in default job: one gpt-oss attention layer, prefill + decode, checked against HF.

Builds a tiny gpt-oss model with random weights (no download), loads its
sliding-window layer (learned sinks, qkv/o bias, YaRN RoPE) into
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
from distattn.hf import attention_config_from_hf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=0, help="0: sliding window 8, 1: full attention")
    parser.add_argument("--kernel", default="auto", help="auto, sdpa or reference")
    args = parser.parse_args()

    torch.manual_seed(0)
    hf_config = transformers.GptOssConfig(
        vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64},
    )
    hf_config._attn_implementation = "eager"
    hf_attn = transformers.models.gpt_oss.modeling_gpt_oss.GptOssAttention(hf_config, layer_idx=args.layer).eval()
    with torch.no_grad():
        for p in hf_attn.parameters():
            p.normal_(0.0, 0.15)
    rotary = transformers.models.gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding(hf_config)

    cfg = attention_config_from_hf(hf_config, args.layer)
    ours = distattn.NeuronAttentionBase(cfg, kernel=args.kernel, layer_idx=args.layer)
    ours.load_hf_state_dict(hf_attn.state_dict())
    print(f"layer {args.layer}: {cfg.num_attention_heads} q heads, {cfg.num_key_value_heads} kv heads, "
          f"window {cfg.sliding_window}, sinks {cfg.has_sinks}, rope {cfg.rope.rope_type}, kernel {args.kernel}")

    prompts, steps, spec = (13, 9), 20, 4
    total = max(prompts) + steps + spec
    x = torch.randn(len(prompts), total, cfg.hidden_size)

    def hf_reference(row: int, length: int) -> torch.Tensor:
        """HF's module over the whole sequence at once: [length, hidden]."""
        pos = torch.arange(length).unsqueeze(0)
        keep = (pos.T >= pos) & (pos.T - pos < (cfg.sliding_window or length + 1))
        mask = torch.zeros(1, 1, length, length).masked_fill(~keep, float("-inf"))
        with torch.no_grad():
            return hf_attn(x[row : row + 1, :length], rotary(x, pos), mask)[0][0]

    mgr = distattn.KVCacheManager(cfg, num_layers=2, max_batch_size=2, max_seq_len=64, speculation_width=spec)
    outputs: list[list[torch.Tensor]] = [[], []]
    start = time.perf_counter()
    with torch.no_grad():
        widths = [list(prompts)] + [[1, 1]] * steps + [[spec, spec]]
        offsets = [0, 0]
        for width in widths:
            seq = max(width)
            pos = torch.stack([torch.arange(o, o + seq) for o in offsets])
            valid = torch.arange(seq).expand(2, seq) < torch.tensor(width).unsqueeze(1)
            hidden = torch.stack([x[b, offsets[b] : offsets[b] + seq] for b in range(2)])  # [2, seq, hidden]
            out = ours(hidden, attention_mask=valid, position_ids=pos, kv_mgr=mgr, idx=args.layer)
            for b in range(2):
                outputs[b].append(out.hidden_states[b, : width[b]])
            offsets = [o + w for o, w in zip(offsets, width)]
    elapsed = time.perf_counter() - start

    worst = 0.0
    for b in range(2):
        got = torch.cat(outputs[b])
        worst = max(worst, (got - hf_reference(b, got.shape[0])).abs().max().item())
    print(f"prefill {prompts} + {steps} decode steps + {spec}-token speculation in {elapsed * 1e3:.1f} ms")
    print(f"max |distattn - HF| = {worst:.2e}  ({'OK' if worst <= 1e-4 else 'MISMATCH'}: fp32 bound 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
