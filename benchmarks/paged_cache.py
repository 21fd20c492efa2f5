"""Memory saved by the paged KV cache and prefill time saved by prefix-cache hits.

    python benchmarks/paged_cache.py [--requests 16] [--system 448] [--smoke] [--out DIR]

A random model per family (built from a transformers config, saved with
save_pretrained, loaded through DecoderLM.from_pretrained; fp32) serves requests
that share a long system prompt, each with its own question (1..`--question` tokens),
`--running` at a time:

- memory: the peak and the mean (over steps) K/V bytes of the paged cache against
  the static cache a `KVCacheManager` holds for the same concurrent batch (rows x
  max_seq_len; for window layers a rolling `window` slots per row), in the same run.
- prefill: `serve` with prefix caching against the same `serve` without it (every
  prompt token computed), in the same run: time of the steps that carry prompt
  tokens, and total time. Both runs and `generate` over the static cache must give
  the same tokens (checked).

Prints a table of ratios and writes DIR/paged_cache.json (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

from distattn import KVCacheManager
from distattn.models import DecoderLM, generate, serve


def build(family: str, root: Path, window: int) -> DecoderLM:
    common = dict(vocab_size=2000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=4096)
    config = transformers.MistralConfig(sliding_window=window, **common) if family == "mistral" else transformers.LlamaConfig(**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / family)
    return DecoderLM.from_pretrained(root / family)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(1)
    system = torch.randint(0, 2000, (args.system,)).tolist()
    lengths = torch.randint(1, args.question + 1, (args.requests,)).tolist()  # questions of different lengths
    prompts = [system + torch.randint(0, 2000, (n,)).tolist() for n in lengths]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llama", "mistral"):
            model = build(family, Path(tmp), args.window)
            kw = dict(max_new_tokens=args.new_tokens, stop_tokens=[], max_running=args.running, prefill_chunk=args.chunk, block_size=args.block)
            serve(model, prompts[:1], **{**kw, "max_new_tokens": 2})  # warm-up
            held: list[int] = []
            tic = time.perf_counter()
            warm = serve(model, prompts, on_step=lambda cache: held.append(cache.bytes_in_use()), **kw)
            warm_s = time.perf_counter() - tic
            tic = time.perf_counter()
            cold = serve(model, prompts, prefix_caching=False, **kw)
            cold_s = time.perf_counter() - tic
            expected = generate(model, prompts, max_new_tokens=args.new_tokens, stop_tokens=[]).tokens
            if not (warm.tokens == cold.tokens == expected):
                raise AssertionError(f"{family}: paged serving and static generate disagree")
            max_len = max(len(p) for p in prompts) + args.new_tokens + 1
            static = KVCacheManager.for_modules([layer.self_attn for layer in model.layers], max_batch_size=args.running, max_seq_len=max_len)
            static_bytes = sum(2 * layer.k.numel() * layer.k.element_size() for layer in static.layers)
            results.append({
                "family": family + (f" (window {args.window})" if family == "mistral" else ""),
                "static_cache_bytes": static_bytes,
                "paged_peak_bytes": warm.extra["peak_cache_bytes"],
                "paged_peak_bytes_no_prefix_cache": cold.extra["peak_cache_bytes"],
                "memory_ratio": warm.extra["peak_cache_bytes"] / static_bytes,
                "paged_mean_bytes": sum(held) / len(held),
                "mean_memory_ratio": sum(held) / len(held) / static_bytes,
                "prompt_tokens": warm.extra["prompt_tokens"],
                "cached_prompt_tokens": warm.extra["cached_prompt_tokens"],
                "prefill_s_prefix_cache": warm.prefill_seconds,
                "prefill_s_no_prefix_cache": cold.prefill_seconds,
                "prefill_time_ratio": warm.prefill_seconds / cold.prefill_seconds,
                "total_s_prefix_cache": warm_s,
                "total_s_no_prefix_cache": cold_s,
                "total_time_ratio": warm_s / cold_s,
            })
    return {"settings": vars(args) | {"out": None}, "threads": torch.get_num_threads(), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--running", type=int, default=4, help="requests served at once")
    parser.add_argument("--system", type=int, default=448, help="shared system-prompt tokens")
    parser.add_argument("--question", type=int, default=64, help="the most tokens of each request's own")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=128, help="prefill tokens per request per step")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--window", type=int, default=128, help="sliding window of the mistral model")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (tests)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.running, args.system, args.question, args.new_tokens, args.chunk, args.window = 4, 2, 40, 6, 3, 16, 16
    report = run(args)
    print(f"{'family':<22}{'memory paged/static: peak':>27}{'mean':>7}{'prompt tokens cached':>22}{'prefill time ratio':>20}{'total time ratio':>18}")
    for r in report["results"]:
        cached = f"{r['cached_prompt_tokens']}/{r['prompt_tokens']}"
        print(f"{r['family']:<22}{r['memory_ratio']:>27.2f}{r['mean_memory_ratio']:>7.2f}{cached:>22}"
              f"{r['prefill_time_ratio']:>20.2f}{r['total_time_ratio']:>18.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paged_cache.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
