"""Whole-model generation: distattn against HF `generate` on the same checkpoint, in the same run.

    distattn bench --model [--quick] [--smoke] [--quantize int8|int4] [--kv-cache-dtype fp8|int8]
                           [--device cuda] [--long-context 8192] [--out benchmarks/results]
    python benchmarks/model_bench.py ...   (the same)

A random Llama checkpoint (vocab 32000, hidden 1024, 8 layers, 16 / 4 heads, intermediate
2816) and a tiny one (2 layers, 64 wide) are saved with `save_pretrained` and loaded by
both sides: `distattn.models.DecoderLM.from_pretrained` + `generate`, and
`AutoModelForCausalLM.from_pretrained` (sdpa) + `generate`, greedy, equal-length
prompts of the same ids. Prefill is the time to the first token and decode the time per
later step, within each N-token generation (ours from `generate`'s own timers, HF's from a
stopping criterion that HF calls once per token); medians after a warm-up, the two sides
alternating run by run. Each case reports
the ratio HF / ours (above 1: we are faster), whether the tokens are equal, and a
roofline: prefill at the model's FLOPs over this run's measured matmul rate, decode at
the bytes of weights and KV read per step over this run's measured bandwidth of a large
weight-times-vector product. `--quantize` / `--kv-cache-dtype` run our side of every case
with quantized weights / a quantized KV cache (HF stays in the case's dtype: the peer).
`--long-context N` instead prefills one N-token prompt and times decode steps over the
full-precision, fp8 and int8 caches (ours against ours, with each cache's memory).
Writes model_bench.json and model_bench.png. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

MODELS: dict[str, dict[str, Any]] = {
    "llama-8L-1024": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096),
    "tiny-2L-64": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    # gpt-oss-shaped: sinks, alternating sliding-window (128) / full layers, 16 experts of which 2 per token
    "gptoss-8L-1024": dict(model_type="gpt_oss", vocab_size=32000, hidden_size=1024, intermediate_size=512, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=16, num_experts_per_tok=2,
                           sliding_window=128, max_position_embeddings=4096),
}
# (model, dtype, batch, prompt, new tokens, pack, compiled): pack None is DecoderLM's default (packed for
# bf16), True holds fp32 weights in oneDNN's layout too (faster batched decode, slower prefill); compiled runs
# the decode steps through torch.compile (DecoderLM.compile_decode; plain weights); pack "int8" quantizes the weights
BenchCase = tuple[str, str, int, int, int, bool | str | None, bool]  # model, dtype, batch, prompt, new, pack, compiled
FULL: list[BenchCase] = [(m, d, b, p, 32 if b == 8 else 64, None, False) for m in ("llama-8L-1024",) for d in ("float32", "bfloat16") for b in (1, 8)
        for p in (512, 2048)]
FULL += [("llama-8L-1024", "float32", 8, 512, 32, True, False), ("llama-8L-1024", "float32", 1, 512, 64, False, True),
         ("llama-8L-1024", "float32", 8, 512, 32, False, True), ("tiny-2L-64", "float32", 4, 32, 64, None, False),
         ("tiny-2L-64", "float32", 4, 32, 64, False, True), ("gptoss-8L-1024", "float32", 1, 512, 64, None, False),
         ("gptoss-8L-1024", "float32", 8, 512, 32, None, False), ("gptoss-8L-1024", "bfloat16", 1, 512, 64, None, False),
         ("llama-8L-1024", "float32", 1, 512, 64, "int8", False), ("llama-8L-1024", "float32", 8, 512, 32, "int8", False)]
QUICK: list[BenchCase] = [("llama-8L-1024", "float32", 1, 512, 64, None, False), ("llama-8L-1024", "float32", 1, 512, 64, False, True),
         ("llama-8L-1024", "float32", 8, 256, 32, None, False), ("llama-8L-1024", "float32", 8, 256, 32, True, False),
         ("llama-8L-1024", "bfloat16", 1, 512, 64, None, False), ("llama-8L-1024", "bfloat16", 8, 256, 32, None, False),
         ("tiny-2L-64", "float32", 4, 32, 64, None, False), ("tiny-2L-64", "float32", 4, 32, 64, False, True),
         ("gptoss-8L-1024", "float32", 1, 512, 64, None, False), ("gptoss-8L-1024", "float32", 8, 256, 32, None, False)]
SMOKE = [("tiny-2L-64", "float32", 2, 8, 4, None, False)]
# --device cuda: bf16 as served on a GPU, fp32 once, a compiled decode step and the MoE model
GPU = [("llama-8L-1024", "bfloat16", 1, 512, 64, None, False), ("llama-8L-1024", "bfloat16", 8, 512, 64, None, False),
       ("llama-8L-1024", "bfloat16", 1, 512, 64, False, True), ("llama-8L-1024", "float32", 1, 512, 64, None, False),
       ("gptoss-8L-1024", "bfloat16", 1, 512, 64, None, False)]


@dataclass
class Case:
    model: str
    dtype: str
    batch: int
    prompt: int
    new_tokens: int
    weights: str  # "packed" (oneDNN layout), "plain", "int8" or "int4"
    decode_step: str  # "compiled" (torch.compile) or "eager"
    kv_cache: str  # the dtype our KV cache stores
    ours_prefill_ms: float
    hf_prefill_ms: float
    ours_decode_ms: float  # per step
    hf_decode_ms: float
    prefill_roofline_ms: float
    decode_roofline_ms: float
    tokens_equal: bool

    @property
    def prefill_speedup(self) -> float:
        return self.hf_prefill_ms / self.ours_prefill_ms

    @property
    def decode_speedup(self) -> float:
        return self.hf_decode_ms / self.ours_decode_ms


def save_checkpoint(name: str, root: Path) -> Path:
    """The random checkpoint `name` under root (made once)."""
    import transformers

    path = root / name
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        fields = dict(MODELS[name])
        config = transformers.AutoConfig.for_model(fields.pop("model_type", "llama"), **fields, tie_word_embeddings=False)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # HF leaves some tensors (experts, sinks) uninitialised: every weight random and small
            for p in model.parameters():
                if p.dim() > 1 or p.numel() == getattr(config, "num_attention_heads", -1):
                    p.normal_(0.0, 0.02)
        model.save_pretrained(path)
    return path


def machine_limits(dtype: torch.dtype, device: str = "cpu") -> tuple[float, float]:
    """(matmul FLOP/s on a model-sized product, bytes/s of a 1-row product with a 256 MiB weight), measured now."""
    a, b = torch.randn(2048, 1024, dtype=dtype, device=device), torch.randn(1024, 2816, dtype=dtype, device=device)
    flops = max(2 * 2048 * 1024 * 2816 / _seconds(lambda: a @ b) for _ in range(10))  # best of 10: a few ms each, noisy
    weight = torch.randn(2**28 // (1024 * (torch.finfo(dtype).bits // 8)), 1024, dtype=dtype, device=device)  # 256 MiB
    x = torch.randn(1, 1024, dtype=dtype, device=device)
    bandwidth = max(weight.numel() * weight.element_size() / _seconds(lambda: torch.nn.functional.linear(x, weight)) for _ in range(3))
    return flops, bandwidth


def _seconds(fn) -> float:
    fn()
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def roofline(cfg: dict, dtype: torch.dtype, batch: int, prompt: int, new: int, flops_per_s: float, bytes_per_s: float) -> tuple[float, float]:
    """(prefill ms, decode ms per step) of a perfect implementation."""
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    dim = cfg.get("head_dim", hidden // heads)
    attention = hidden * (heads * dim + 2 * kv * dim) + heads * dim * hidden
    experts, top_k = cfg.get("num_local_experts", 1), cfg.get("num_experts_per_tok", 1)
    layer_params = attention + 3 * hidden * inter * top_k  # the weights one token multiplies with
    # decode reads the experts some row chose: k of them for one row, the expected distinct ones for a batch
    read_experts = experts * (1 - (1 - top_k / experts) ** batch)
    step_params = attention + 3 * hidden * inter * read_experts
    flops = 2 * batch * prompt * layer_params * layers + 2 * batch * hidden * vocab  # logits of the last position
    flops += 4 * batch * layers * heads * dim * prompt * (prompt + 1) / 2  # causal attention
    elem = torch.finfo(dtype).bits // 8
    cached = prompt + new / 2  # mean cache length over the decode steps
    step_bytes = elem * (layers * step_params + hidden * vocab + batch * layers * 2 * kv * dim * cached)
    return 1e3 * flops / flops_per_s, 1e3 * step_bytes / bytes_per_s


def run_case(path: Path, model: str, dtype_name: str, batch: int, prompt: int, new: int, pack: bool | str | None, compiled: bool, repeats: int,
             limits: dict, quantize: str | None = None, kv_cache_dtype: str | None = None, device: str = "cpu") -> Case:
    import transformers

    from ..models.decoder import DecoderLM
    from ..runtime.generate import generate

    dtype = getattr(torch, dtype_name)
    quantize = quantize or (pack if pack in ("int8", "int4") else None)
    packed = False if device != "cpu" else None if quantize else pack if isinstance(pack, bool) else None
    ours = DecoderLM.from_pretrained(path, dtype=dtype, pack=packed, quantize=quantize, kv_cache_dtype=kv_cache_dtype).to(device)
    weights = quantize if quantize else "packed" if ours.lm_head.packed is not None else "plain"
    if compiled:
        ours.compile_decode()  # compiled in the warm-up run below
    # HF's sdpa path has no attention sinks: gpt-oss runs HF's eager attention (its default on CPU)
    attention = "eager" if MODELS[model].get("model_type") == "gpt_oss" else "sdpa"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention).eval().to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, MODELS[model]["vocab_size"], (batch, prompt), generator=gen).to(device)
    prompts = ids.tolist()

    def ours_run(n: int) -> tuple[list[list[int]], float, float]:
        """(tokens, prefill seconds (to the first token), decode seconds per step) from generate's own timers."""
        result = generate(ours, prompts, max_new_tokens=n, stop_tokens=[])
        return result.tokens, result.prefill_seconds, result.decode_seconds / max(result.decode_steps, 1)

    class Stamps(transformers.StoppingCriteria):
        """HF generate asks its stopping criteria once per new token: the time of each token."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            _sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def hf_run(n: int) -> tuple[list[list[int]], float, float]:
        stamps = Stamps()
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None, stopping_criteria=transformers.StoppingCriteriaList([stamps]))
        times = stamps.times
        return out[:, prompt:].tolist(), times[0] - start, (times[-1] - times[0]) / max(len(times) - 1, 1)

    ours_tokens, hf_tokens = ours_run(new)[0], hf_run(new)[0]  # warm-up, and the tokens
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "hf": []}
    for _ in range(repeats):  # the two sides alternate, so drift of the machine hits both alike
        for name, run in (("ours", ours_run), ("hf", hf_run)):
            _, first, step = run(new)
            runs[name].append((first * 1e3, step * 1e3))
    times = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in runs.items()}
    flops, bandwidth = limits[dtype_name]
    pre_roof, dec_roof = roofline(MODELS[model], dtype, batch, prompt, new, flops, bandwidth)
    return Case(model, dtype_name, batch, prompt, new, weights, "compiled" if compiled else "eager", kv_cache_dtype or dtype_name,
                times["ours"][0], times["hf"][0],
                times["ours"][1], times["hf"][1], pre_roof, dec_roof, ours_tokens == hf_tokens)


def long_context(path: Path, vocab: int, dtype_name: str, context: int, steps: int, device: str = "cpu", quantize: str | None = None,
                 compiled: bool = False) -> list[dict]:
    """Decode steps after one `context`-token prompt over the full-precision, fp8 and int8 KV caches:
    per kv cache dtype, the median step time (from the step callbacks of `generate`), the cache's bytes,
    and the greedy tokens' first difference from the full-precision cache's."""
    from ..models.decoder import DecoderLM
    from ..runtime.generate import generate

    dtype = getattr(torch, dtype_name)
    prompt = torch.randint(1, vocab, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    rows: list[dict[str, Any]] = []
    for kv_cache_dtype in (None, "fp8", "int8"):
        model = DecoderLM.from_pretrained(path, dtype=dtype, pack=False if device != "cpu" else None, quantize=quantize,
                                          kv_cache_dtype=kv_cache_dtype).to(device)
        if compiled:
            model.compile_decode()  # compiled during the first decode steps: the median below skips them
        stamps: list[float] = []

        def stamp(_: int) -> None:
            _sync()
            stamps.append(time.perf_counter())

        tokens = generate(model, [prompt], max_new_tokens=steps + 1, stop_tokens=[], on_tokens=stamp).tokens[0]
        warm = 4 if compiled else 1  # after the prefill's token (and, compiled, the steps that compile)
        step_ms = statistics.median(1e3 * (b - a) for a, b in zip(stamps[warm:], stamps[warm + 1 :]))
        rows.append({"kv_cache": kv_cache_dtype or dtype_name, "decode_ms": step_ms,
                     "cache_bytes": model.new_cache(1, context + steps + 1).memory_bytes(), "tokens": tokens})
        del model
    for row in rows:
        differ = [i for i, (a, b) in enumerate(zip(row["tokens"], rows[0]["tokens"])) if a != b]
        row["first_difference"] = differ[0] if differ else None
        row["decode_vs_full"] = row["decode_ms"] / rows[0]["decode_ms"]
        row["memory_vs_full"] = row["cache_bytes"] / rows[0]["cache_bytes"]
        same = "equal" if not differ else f"differ from step {differ[0]}"
        print(f"context {context}, {row['kv_cache']} KV cache{' (compiled decode)' if compiled else ''}: decode {row['decode_ms']:.2f} ms per step "
              f"({row['decode_vs_full']:.2f}x the {dtype_name} cache's time), cache {row['cache_bytes'] / 2**20:.1f} MiB "
              f"({row['memory_vs_full']:.3f}x), greedy tokens {same}", flush=True)
    return rows


def plot(cases: list[Case], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c.model.split('-')[0]} {c.dtype.replace('float', 'f')}{' packed' if c.weights == 'packed' else ''}"
              f"{' compiled' if c.decode_step == 'compiled' else ''}\nb{c.batch} p{c.prompt}" for c in cases]
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cases)), 4))
    ax.bar([i - 0.2 for i in x], [c.prefill_speedup for c in cases], 0.4, label="prefill")
    ax.bar([i + 0.2 for i in x], [c.decode_speedup for c in cases], 0.4, label="decode step")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("HF generate time / distattn time")
    ax.set_title("Whole-model generation vs HF transformers (same checkpoint, same run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of `distattn bench --model` (SystemExit(2) on a bad one)."""
    parser = argparse.ArgumentParser(prog="distattn bench --model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the issue's cases only (minutes)")
    parser.add_argument("--smoke", action="store_true", help="one tiny case (seconds; for tests)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cache-dir", default=None, help="where the checkpoints are saved (default: a temporary directory)")
    parser.add_argument("--only", choices=sorted(MODELS), help="only this model's cases (results get its name as a suffix)")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="our weights quantized in every case")
    parser.add_argument("--kv-cache-dtype", choices=["fp8", "int8"], help="our KV cache quantized in every case")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    parser.add_argument("--compile", action="store_true", help="only the cases with a compiled decode step (with --long-context: compile it)")
    parser.add_argument("--long-context", type=int, metavar="N",
                        help="instead: decode after an N-token prompt over the full, fp8 and int8 KV caches (llama-8L-1024, or --only's model)")
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: pass cpu, or cuda on a machine with a CUDA GPU")
    if args.long_context is not None and args.long_context <= 0:
        parser.error(f"--long-context {args.long_context}: pass a positive number of prompt tokens")
    return args


def main(argv: list[str] | None = None) -> list[Case]:
    """Run the cases and write model_bench.json / .png under --out."""
    args = parse_args(argv)
    if args.long_context is not None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.cache_dir).expanduser() if args.cache_dir else Path(tmp)
            model, dtype_name = args.only or "llama-8L-1024", "bfloat16" if args.device == "cuda" else "float32"
            rows = long_context(save_checkpoint(model, root), MODELS[model]["vocab_size"], dtype_name, args.long_context,
                                8 if args.smoke else 16, args.device, args.quantize, args.compile)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"model": model, "context": args.long_context, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]}
        report["decode_step"] = "compiled" if args.compile else "eager"
        name = "model_bench_long_context" + "".join(f"_{v}" for v in (args.device != "cpu" and args.device, args.compile and "compiled") if v)
        (out / f"{name}.json").write_text(json.dumps(report, indent=2))
        return []
    cases = SMOKE if args.smoke else GPU if args.device == "cuda" else QUICK if args.quick else FULL
    if args.only:
        cases = [c for c in cases if c[0] == args.only]
    if args.compile:
        cases = [c for c in cases if c[6]]
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.cache_dir).expanduser() if args.cache_dir else Path(tmp)
        limits = {d: machine_limits(getattr(torch, d), args.device) for d in sorted({c[1] for c in cases})}
        for d, (flops, bandwidth) in limits.items():
            print(f"{d}: matmul {flops / 1e9:.0f} GFLOP/s, weight x vector {bandwidth / 1e9:.1f} GB/s")
        results = []
        for model, dtype_name, batch, prompt, new, pack, compiled in cases:
            case = run_case(save_checkpoint(model, root), model, dtype_name, batch, prompt, new, pack, compiled, 1 if args.smoke else args.repeats,
                            limits, args.quantize, args.kv_cache_dtype, args.device)
            results.append(case)
            print(f"{model} {dtype_name} ({case.weights} weights, {case.kv_cache} KV, {case.decode_step} decode) batch {batch} prompt {prompt}: prefill {case.ours_prefill_ms:.0f} / HF {case.hf_prefill_ms:.0f} ms "
                  f"({case.prefill_speedup:.2f}x HF, {case.ours_prefill_ms / case.prefill_roofline_ms:.2f}x roofline); decode "
                  f"{case.ours_decode_ms:.2f} / HF {case.hf_decode_ms:.2f} ms per step ({case.decode_speedup:.2f}x HF, "
                  f"{case.ours_decode_ms / case.decode_roofline_ms:.2f}x roofline); tokens {'equal' if case.tokens_equal else 'DIFFER'}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if args.smoke else f"_{args.only}" if args.only else ""
    suffix += "".join(f"_{v}" for v in (args.quantize, args.kv_cache_dtype and f"kv-{args.kv_cache_dtype}", args.device != "cpu" and args.device,
                                        args.compile and "compiled") if v)
    report = {"machine": {d: {"matmul_gflops": f / 1e9, "weight_vector_gbps": b / 1e9} for d, (f, b) in limits.items()},
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cases": [dict(asdict(c), prefill_speedup=c.prefill_speedup, decode_speedup=c.decode_speedup) for c in results]}
    (out / f"model_bench{suffix}.json").write_text(json.dumps(report, indent=2))
    plot(results, out / f"model_bench{suffix}.png")
    return results


if __name__ == "__main__":
    main()
