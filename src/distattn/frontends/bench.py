"""distattn's attention against Hugging Face transformers' module and the machine's limits.

    distattn bench [--quick] [--smoke] [--out benchmarks/results]
    python benchmarks/attention_bench.py ...   (the same)

Same weights, same inputs, same process: HF's attention module (eager; sdpa where the
model supports it) and NeuronAttentionBase, for
- gpt-oss-20b attention: hidden 2880, 64 q / 8 kv heads of 64, sinks, qkv and o bias,
  a sliding-128 layer and a full layer;
- Llama-3-8B attention: hidden 4096, 32 q / 8 kv heads of 128;
prefill of 512 / 2048 / 8192 / 16384 tokens and decode with 2048 and 32768 cached tokens
at batch 1 and 8, in fp32 and bf16. Each case reports median milliseconds, the
speedup over HF, the roofline (FLOPs at the matmul rate and bytes at the copy
bandwidth, both measured in this run), and the peak memory growth of the call. HF
runs are skipped where their memory estimate exceeds --hf-memory-gib.

glibc's allocator settings are pinned (the script re-executes itself with them), since
eager decode timings otherwise depend on run order. Writes attention_bench.json and
attention_bench.png under --out. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}

import torch
import transformers

from .. import KVCacheManager, NeuronAttentionBase
from ..hf import attention_config_from_hf

LIBC = ctypes.CDLL("libc.so.6")


@dataclass
class Result:
    model: str
    layer: str
    stage: str
    tokens: int  # prompt length (prefill) or cached tokens (decode)
    batch: int
    dtype: str
    ours_ms: float
    hf_eager_ms: float | None
    hf_sdpa_ms: float | None
    roofline_ms: float
    ours_peak_mib: float
    hf_peak_mib: float | None

    @property
    def speedup(self) -> float | None:
        return None if self.hf_eager_ms is None else self.hf_eager_ms / self.ours_ms


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median ms, peak MiB growth) of fn() after warm-up."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        LIBC.malloc_trim(0)
        before = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        peak = (_rss_kib("VmHWM") - before) / 1024
    return statistics.median(times), peak


def machine_limits(dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) measured now."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    ms, _ = timed(lambda: torch.mm(a, b), repeats=5)
    flops = 2 * 2048**3 / (ms / 1e3)
    src = torch.randn(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src), repeats=5)
    return flops, 2 * src.numel() * 4 / (ms / 1e3)


def hf_layers(model: str) -> tuple[transformers.PretrainedConfig, dict[str, int], bool]:
    """(config, layer name -> index, whether HF supports sdpa for it)."""
    cfg: transformers.PretrainedConfig
    if model == "gpt-oss-20b":
        cfg = transformers.GptOssConfig(hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                                        sliding_window=128, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
        return cfg, {"sliding-128": 0, "full": 1}, False
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_hidden_layers=1, max_position_embeddings=131072,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    return cfg, {"full": 0}, True


def build(model: str, layer_idx: int, dtype: torch.dtype, impl: str) -> tuple:
    cfg: Any
    cfg, _, _ = hf_layers(model)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    hf: Any
    rotary: Any
    if model == "gpt-oss-20b":
        hf = transformers.models.gpt_oss.modeling_gpt_oss.GptOssAttention(cfg, layer_idx)
        rotary = transformers.models.gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding(cfg)
    else:
        hf = transformers.models.llama.modeling_llama.LlamaAttention(cfg, layer_idx)
        rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02)
    hf = hf.to(dtype).eval()
    ours = NeuronAttentionBase(attention_config_from_hf(cfg, layer_idx), layer_idx=0, dtype=dtype)
    ours.load_hf_state_dict(hf.state_dict())
    return cfg, hf, rotary, ours


def cost(cfg, layer_window: int | None, stage: str, tokens: int, batch: int, elem: int) -> tuple[float, float]:
    """(FLOPs, bytes) a perfect implementation needs."""
    hidden, heads, kv, dim = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    weights = hidden * (2 * heads * dim + 2 * kv * dim)
    if stage == "prefill":
        rows = batch * tokens
        seen = sum(min(p + 1, layer_window or p + 1) for p in range(tokens)) * batch  # visible keys, summed over queries
        return 2 * rows * weights + 4 * seen * heads * dim, elem * (weights + 4 * rows * hidden)
    seen = min(tokens + 1, layer_window or tokens + 1)
    return 2 * batch * weights + 4 * batch * seen * heads * dim, elem * (weights + 2 * batch * seen * kv * dim)


def run_case(model, layer, stage, tokens, batch, dtype, limits, args) -> Result:
    cfg, layers, hf_sdpa_ok = hf_layers(model)
    idx = layers[layer]
    window = 128 if layer.startswith("sliding") else None
    elem = torch.finfo(dtype).bits // 8
    case = (model, idx, cfg, hf_sdpa_ok, window, tokens, batch, dtype, elem)
    ours_fn, hf_eager_fn, hf_sdpa_fn, hf_memory, repeats = (_prefill_case if stage == "prefill" else _decode_case)(*case)
    ours_ms, ours_peak = timed(ours_fn, repeats)
    hf_ms = hf_peak = hf_sdpa_ms = None
    if hf_memory <= args.hf_memory_gib * 2**30:
        hf_ms, hf_peak = timed(hf_eager_fn, repeats)
        if hf_sdpa_fn is not None:
            hf_sdpa_ms, _ = timed(hf_sdpa_fn, repeats)
    flops, nbytes = cost(cfg, window, stage, tokens, batch, elem)
    roofline = max(flops / limits[dtype][0], nbytes / limits[dtype][1]) * 1e3
    return Result(model, layer, stage, tokens, batch, str(dtype).replace("torch.", ""), ours_ms, hf_ms, hf_sdpa_ms, roofline, ours_peak, hf_peak)


def _prefill_case(model, idx, cfg, hf_sdpa_ok, window, tokens, batch, dtype, elem) -> tuple:
    """(ours, HF eager, HF sdpa or None, HF's memory estimate, repeats) of a prefill case."""
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    _, hf, rotary, ours = build(model, idx, dtype, "eager")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, hidden, generator=gen).to(dtype)
    pos = torch.arange(tokens).expand(batch, tokens)
    keep = (pos[0, :, None] >= pos[0, None, :]) & (pos[0, :, None] - pos[0, None, :] < (window or tokens + 1))
    mask = torch.zeros(1, 1, tokens, tokens, dtype=dtype).masked_fill(~keep, float("-inf"))
    ours_fn = lambda: ours(x, position_ids=pos)  # noqa: E731
    emb = rotary(x, pos)
    hf_eager_fn = lambda: hf(x, emb, mask)  # noqa: E731
    hf_memory = batch * heads * tokens * tokens * 4 * 4  # scores, softmax (fp32) and copies
    hf_sdpa_fn = None
    if hf_sdpa_ok:
        _, hf_s, _, _ = build(model, idx, dtype, "sdpa")
        hf_sdpa_fn = lambda: hf_s(x, emb, None if window is None else mask)  # noqa: E731
    repeats = 3 if tokens <= 2048 else 1
    return ours_fn, hf_eager_fn, hf_sdpa_fn, hf_memory, repeats


def _decode_case(model, idx, cfg, hf_sdpa_ok, window, tokens, batch, dtype, elem) -> tuple:
    """(ours, HF eager, HF sdpa or None, HF's memory estimate, repeats) of a decode case."""
    heads, kv, dim, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    _, hf, rotary, ours = build(model, idx, dtype, "eager")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, hidden, generator=gen).to(dtype)
    cache = KVCacheManager.for_modules([ours], max_batch_size=batch, max_seq_len=tokens + 64)
    layer_cache = cache[0]
    held = min(tokens, layer_cache.cache_len)
    layer_cache.k[:, :, :held] = torch.randn(batch, kv, held, dim, generator=gen).to(dtype)
    layer_cache.v[:, :, :held] = torch.randn(batch, kv, held, dim, generator=gen).to(dtype)
    kept = torch.arange(tokens - held, tokens)
    layer_cache.positions[:, kept % layer_cache.cache_len if layer_cache.rolling else kept] = kept
    step = {"t": tokens}

    def ours_fn():
        ours(x, position_ids=torch.full((batch, 1), step["t"]), kv_mgr=cache, idx=0)
        step["t"] += 1

    hf_cache = transformers.DynamicCache(config=cfg)
    k0 = torch.randn(batch, kv, tokens, dim, generator=gen).to(dtype)
    hf_cache.update(k0, k0.clone(), idx)
    hf_step = {"t": tokens}

    def hf_eager_fn():
        pos = torch.full((batch, 1), hf_step["t"])
        hf(x, rotary(x, pos), None, cache=hf_cache)
        hf_step["t"] += 1

    held_hf = min(tokens, window or tokens)
    hf_memory = 3 * batch * heads * held_hf * dim * elem + 2 * batch * kv * tokens * dim * elem  # repeat_kv copies + cache
    hf_sdpa_fn = None
    if hf_sdpa_ok:
        _, hf_s, _, _ = build(model, idx, dtype, "sdpa")
        hf_cache_s = transformers.DynamicCache(config=cfg)
        hf_cache_s.update(k0.clone(), k0.clone(), idx)

        def hf_sdpa_fn():
            pos = torch.full((batch, 1), hf_step["t"])
            hf_s(x, rotary(x, pos), None, cache=hf_cache_s)

    repeats = 10
    return ours_fn, hf_eager_fn, hf_sdpa_fn, hf_memory, repeats


Case = tuple[str, str, str, int, int, torch.dtype]  # model, layer, stage, tokens, batch, dtype


def cases(args: argparse.Namespace) -> list[Case]:
    if args.smoke:  # seconds: the script's plumbing, for the test suite
        return [("llama3-8b", "full", "prefill", 64, 1, torch.float32), ("gpt-oss-20b", "sliding-128", "decode", 256, 1, torch.float32)]
    prefill = [512, 2048] if args.quick else [512, 2048, 8192, 16384]
    contexts = [2048] if args.quick else [2048, 32768]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    out: list[Case] = []
    for dtype in dtypes:
        for model in ("gpt-oss-20b", "llama3-8b"):
            for layer in hf_layers(model)[1]:
                out += [(model, layer, "prefill", n, 1, dtype) for n in prefill if not (n == 16384 and dtype == torch.float32 and layer == "full" and model == "llama3-8b")]
                out += [(model, layer, "decode", n, b, dtype) for n in contexts for b in (1, 8)]
    return out


def chart(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.speedup is not None]
    labels = [f"{r.model} {r.layer}\n{r.stage} {r.tokens} b{r.batch} {r.dtype}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(shown)), 5))
    ax.bar(range(len(shown)), [r.speedup or 0.0 for r in shown], color="tab:blue", label="speedup over HF eager")
    ax.bar(range(len(shown)), [r.roofline_ms / r.ours_ms for r in shown], color="tab:orange", alpha=0.7, width=0.4, label="fraction of roofline")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(shown)), labels, rotation=90, fontsize=6)
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("distattn vs HF transformers attention (same weights, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The benchmark's options (`distattn bench --help`)."""
    parser = argparse.ArgumentParser(prog="distattn bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fp32, shorter prompts and contexts")
    parser.add_argument("--smoke", action="store_true", help="two tiny cases (plumbing check)")
    parser.add_argument("--hf-memory-gib", type=float, default=10.0, help="skip HF runs estimated above this")
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (re-executed once with glibc's allocator settings pinned)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(os.environ.get(k) != v for k, v in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, "-m", "distattn.frontends.bench", *argv], {**os.environ, **PINNED_MALLOC})
    args = parse_args(argv)
    torch.manual_seed(0)
    limits = {dt: machine_limits(dt) for dt in (torch.float32, torch.bfloat16)}
    print(f"machine: {torch.get_num_threads()} threads; matmul {limits[torch.float32][0] / 1e9:.0f} GFLOP/s fp32, "
          f"{limits[torch.bfloat16][0] / 1e9:.0f} GFLOP/s bf16; copy {limits[torch.float32][1] / 1e9:.1f} GB/s", flush=True)
    print(f"{'model':<12} {'layer':<12} {'stage':<8} {'tokens':>6} {'b':>2} {'dtype':<9} {'ours ms':>9} {'HF eager':>9} {'HF sdpa':>9} "
          f"{'speedup':>8} {'roofline':>9} {'ours/roof':>9} {'ours MiB':>9} {'HF MiB':>8}", flush=True)
    results = []
    for case in cases(args):
        r = run_case(*case, limits, args)
        results.append(r)
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r.model:<12} {r.layer:<12} {r.stage:<8} {r.tokens:>6} {r.batch:>2} {r.dtype:<9} {r.ours_ms:>9.2f} {fmt(r.hf_eager_ms, '9.2f'):>9} "
              f"{fmt(r.hf_sdpa_ms, '9.2f'):>9} {fmt(r.speedup, '8.2f'):>8} {r.roofline_ms:>9.2f} {r.ours_ms / r.roofline_ms:>9.2f} "
              f"{r.ours_peak_mib:>9.0f} {fmt(r.hf_peak_mib, '8.0f'):>8}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"threads": torch.get_num_threads(), "matmul_gflops": {str(k): v[0] / 1e9 for k, v in limits.items()},
               "copy_gbps": limits[torch.float32][1] / 1e9, "malloc": PINNED_MALLOC, "torch": torch.__version__,
               "transformers": transformers.__version__}
    (args.out / "attention_bench.json").write_text(json.dumps({"machine": machine, "results": [asdict(r) | {"speedup": r.speedup} for r in results]}, indent=2))
    chart(results, args.out / "attention_bench.png")
    print(f"wrote {args.out / 'attention_bench.json'} and attention_bench.png")


if __name__ == "__main__":
    main()
