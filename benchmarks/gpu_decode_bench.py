"""Greedy generation on one GPU: distattn (eager device loop, CUDA-graph loop) against HF generate (dynamic cache,
eager; static cache, compiled) on a TinyLlama-shaped random bf16 checkpoint, with the GPU's limits measured in the
same run (device-to-device copy bandwidth, bf16 matmul rate).

    python benchmarks/gpu_decode_bench.py [--out benchmarks/results] [--tiny] [--device cpu]

Prints a table and writes gpu_decode_bench.json and .png under --out. --tiny: a 2-layer model (the script's
plumbing, seconds; also runs on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from distattn.models import DecoderLM, generate  # noqa: E402

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
TINY = dict(TINYLLAMA, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def limits(device: str) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, each the median of 10 after warm-up."""
    def timed(fn, repeats: int = 10) -> float:  # noqa: ANN001
        fn()
        sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    n = 2**28 if device == "cuda" else 2**24
    src, dst = torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.float32, device=device)
    copy = 2 * 4 * n / timed(lambda: dst.copy_(src))
    m = 8192 if device == "cuda" else 1024
    a, b = torch.randn(m, m, dtype=torch.bfloat16, device=device), torch.randn(m, m, dtype=torch.bfloat16, device=device)
    return {"copy_bytes_per_s": copy, "bf16_flops": 2 * m**3 / timed(lambda: a @ b)}


def checkpoint(root: Path, fields: dict) -> tuple[Path, int]:
    """A random bf16 Llama checkpoint saved with save_pretrained; (its directory, its bytes of weights)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(root)
    return root, sum(p.numel() * p.element_size() for p in model.parameters())


def ours(model: DecoderLM, device: str, prompts: list[list[int]], new: int, graphs: bool) -> dict:
    """Prefill and per-step decode times of distattn's generate (after a warm-up call), and its tokens."""
    generate(model, prompts, max_new_tokens=4, stop_tokens=[], cuda_graphs=graphs)  # warm-up: allocations, kernels, a capture
    sync(device)
    start = time.perf_counter()
    result = generate(model, prompts, max_new_tokens=new, stop_tokens=[], cuda_graphs=graphs)
    sync(device)
    total = time.perf_counter() - start
    return {"prefill_ms": 1e3 * result.prefill_seconds, "decode_ms": 1e3 * result.decode_seconds / max(result.decode_steps, 1),
            "request_ms": 1e3 * total, "tokens": result.tokens}


class Stamps(transformers.StoppingCriteria):
    """HF generate asks its stopping criteria once per new token: the time of each."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf(model: transformers.PreTrainedModel, device: str, prompts: list[list[int]], new: int, static: bool) -> dict:
    ids = torch.tensor(prompts, device=device)
    options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        options["cache_implementation"] = "static"

    def run(n: int) -> tuple[list[list[int]], list[float], float]:
        stamps = Stamps(device)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), stopping_criteria=[stamps], **{**options, "max_new_tokens": n, "min_new_tokens": n})
        return out[:, ids.shape[1]:].tolist(), stamps.times, start

    run(new)  # warm-up (and, static, compilation)
    tokens, times, start = run(new)
    return {"prefill_ms": 1e3 * (times[0] - start), "decode_ms": 1e3 * (times[-1] - times[0]) / max(len(times) - 1, 1),
            "request_ms": 1e3 * (times[-1] - start), "tokens": tokens}


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    """The first new-token index where any row differs (None: equal)."""
    found = [i for ra, rb in zip(a, b) for i, (x, y) in enumerate(zip(ra, rb)) if x != y]
    return min(found) if found else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: the plumbing, in seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args(argv)
    fields, device = (TINY if args.tiny else TINYLLAMA), args.device
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                    "transformers": transformers.__version__, "limits": limits(device), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        path, weight_bytes = checkpoint(Path(tmp) / "tinyllama", fields)
        report["weight_bytes"] = weight_bytes
        gen = torch.Generator().manual_seed(1)
        mine = DecoderLM.from_pretrained(path, dtype=torch.bfloat16, pack=False).to(device)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").to(device).eval()
        for batch in (1, 8):
            prompts = torch.randint(1, fields["vocab_size"], (batch, 512), generator=gen).tolist()
            case = {"batch": batch, "prompt": 512, "new": args.new,
                    "floor_decode_ms": 1e3 * weight_bytes / report["limits"]["copy_bytes_per_s"],  # every weight read once
                    "floor_prefill_ms": 1e3 * 2 * weight_bytes / 2 * batch * 512 / report["limits"]["bf16_flops"]}
            for name, run in (("ours_graphs", lambda: ours(mine, device, prompts, args.new, True)),
                              ("ours_eager", lambda: ours(mine, device, prompts, args.new, False)),
                              ("hf_eager", lambda: hf(theirs, device, prompts, args.new, False)),
                              ("hf_static", lambda: hf(theirs, device, prompts, args.new, True))):
                case[name] = run()
                print(f"batch {batch} {name:<12} prefill {case[name]['prefill_ms']:8.2f} ms  decode {case[name]['decode_ms']:7.3f} ms/step  "
                      f"request {case[name]['request_ms']:8.1f} ms", flush=True)
            case["bf16_first_difference_vs_ours_eager"] = first_difference(case["ours_graphs"]["tokens"], case["ours_eager"]["tokens"])
            case["bf16_first_difference_vs_hf_eager"] = first_difference(case["ours_graphs"]["tokens"], case["hf_eager"]["tokens"])
            report["cases"].append(case)
        del mine, theirs
        full = DecoderLM.from_pretrained(path, dtype=torch.float32, pack=False).to(device)
        fp32 = [torch.randint(1, fields["vocab_size"], (1, 64), generator=gen).tolist()[0]]
        report["fp32_graph_tokens_equal_eager"] = ours(full, device, fp32, 32, True)["tokens"] == ours(full, device, fp32, 32, False)["tokens"]
    print(json.dumps({k: v for k, v in report.items() if k != "cases"}, indent=1))
    for case in report["cases"]:
        for name in ("ours_graphs", "ours_eager", "hf_eager", "hf_static"):
            case[name].pop("tokens")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_decode_bench.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
