"""Multi-LoRA speed: our mixed-adapter batches against PEFT on HF transformers, same weights, same run.

    python benchmarks/lora_bench.py [--adapters 4] [--rank 16] [--smoke] [--out DIR]

A random Llama model (built from a transformers config, saved with save_pretrained,
fp32) carries `--adapters` LoRA adapters on q/k/v/o, created and saved by PEFT and
loaded by each side from disk. A batch of 8 rows mixes every adapter and base rows.
Measured, medians of several runs:

- prefill of `--prompt` tokens per row, and one decode step over that cache;
- peer: PEFT's mixed-batch forward (`adapter_names=` one per row) on HF's model with
  its DynamicCache; ours: DecoderLM with `adapter_ids` over a KVCacheManager;
- the cost of the adapters: each side against itself without adapters.

The logits of both sides are compared first (they must agree). Prints a table of
milliseconds and ratios and writes DIR/lora_bench.json (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from distattn.models import DecoderLM


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    import peft

    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256))
    torch.manual_seed(0)
    batch = 8
    adapter_ids = [i % (args.adapters + 1) - 1 for i in range(batch)]  # -1 (base), 0, 1, ... mixed
    names = ["__base__" if a < 0 else f"a{a}" for a in adapter_ids]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        hf.save_pretrained(root / "base")
        paths = []
        for i in range(args.adapters):
            lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
            wrapped = peft.get_peft_model(hf, lora)
            wrapped.save_pretrained(root / f"a{i}")
            hf = wrapped.unload()
            paths.append(root / f"a{i}")
        peer = peft.PeftModel.from_pretrained(hf, paths[0], adapter_name="a0")
        for i in range(1, args.adapters):
            peer.load_adapter(paths[i], adapter_name=f"a{i}")
        peer.eval()
        ours = DecoderLM.from_pretrained(root / "base")
        ours.load_lora_adapters(paths)
        plain = DecoderLM.from_pretrained(root / "base")

        ids = torch.randint(0, 1000, (batch, args.prompt), generator=torch.Generator().manual_seed(1))
        token = torch.randint(0, 1000, (batch, 1), generator=torch.Generator().manual_seed(2))
        positions = torch.arange(args.prompt).expand(batch, -1)
        lora_ids = torch.tensor(adapter_ids)

        with torch.no_grad():
            expected = peer(input_ids=ids, adapter_names=names).logits
            got = ours(ids, position_ids=positions, cache=ours.new_cache(batch, args.prompt + 8), adapter_ids=lora_ids)
            err = (got - expected).abs().max().item()
            if not err <= 1e-3:  # fp32 on both sides, several layers deep
                raise AssertionError(f"our logits differ from PEFT's by {err:.3g}")

            def peer_prefill(with_lora: bool = True):
                cache = transformers.DynamicCache()
                if with_lora:
                    peer(input_ids=ids, past_key_values=cache, use_cache=True, adapter_names=names)
                else:
                    with peer.disable_adapter():
                        peer(input_ids=ids, past_key_values=cache, use_cache=True)
                return cache

            def ours_prefill(model, lora):
                cache = model.new_cache(batch, args.prompt + 8)
                model(ids, position_ids=positions, cache=cache, adapter_ids=lora)
                return cache

            results = []
            for stage in ("prefill", "decode"):
                row = {"stage": stage, "tokens": args.prompt, "batch": batch}
                if stage == "prefill":
                    row["peft_ms"] = timed(lambda: peer_prefill(), args.repeats)
                    row["peft_base_ms"] = timed(lambda: peer_prefill(False), args.repeats)
                    row["ours_ms"] = timed(lambda: ours_prefill(ours, lora_ids), args.repeats)
                    row["ours_base_ms"] = timed(lambda: ours_prefill(plain, None), args.repeats)
                else:
                    step = torch.full((batch, 1), args.prompt)

                    def peer_step(with_lora: bool = True) -> None:
                        cache = peer_cache[with_lora]
                        if with_lora:
                            peer(input_ids=token, past_key_values=cache, use_cache=True, adapter_names=names)
                        else:
                            with peer.disable_adapter():
                                peer(input_ids=token, past_key_values=cache, use_cache=True)
                        cache.crop(-1)  # the same step every time: drop the token this call appended

                    peer_cache = {True: peer_prefill(), False: peer_prefill(False)}
                    ours_cache = {True: ours_prefill(ours, lora_ids), False: ours_prefill(plain, None)}
                    row["peft_ms"] = timed(lambda: peer_step(), args.repeats)
                    row["peft_base_ms"] = timed(lambda: peer_step(False), args.repeats)
                    row["ours_ms"] = timed(lambda: ours(token, position_ids=step, cache=ours_cache[True], adapter_ids=lora_ids), args.repeats)
                    row["ours_base_ms"] = timed(lambda: plain(token, position_ids=step, cache=ours_cache[False]), args.repeats)
                row["speedup_vs_peft"] = row["peft_ms"] / row["ours_ms"]
                row["ours_lora_cost"] = row["ours_ms"] / row["ours_base_ms"]
                row["peft_lora_cost"] = row["peft_ms"] / row["peft_base_ms"]
                results.append(row)
    return {"settings": vars(args) | {"out": None}, "logits_max_abs_diff": err, "threads": torch.get_num_threads(), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny run (tests)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.smoke:
        args.adapters, args.rank, args.hidden, args.layers, args.prompt, args.repeats = 2, 4, 128, 1, 16, 1
    report = run(args)
    print(f"logits: max |ours - PEFT| = {report['logits_max_abs_diff']:.2e}")
    print(f"{'stage':<9}{'ours ms':>9}{'PEFT ms':>9}{'speedup':>9}{'LoRA cost ours':>16}{'LoRA cost PEFT':>16}")
    for r in report["results"]:
        print(f"{r['stage']:<9}{r['ours_ms']:>9.1f}{r['peft_ms']:>9.1f}{r['speedup_vs_peft']:>8.2f}x{r['ours_lora_cost']:>15.2f}x{r['peft_lora_cost']:>15.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_bench.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
