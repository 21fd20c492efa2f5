"""Per-rank peak memory of a long-prompt prefill under context parallelism.

    python benchmarks/cp_memory.py [--seq 8192] [--cps 1 2 4]

For each cp degree (attention tp 1, so tp = cp processes, gloo on CPU) every rank
runs one prefill of its rows of the prompt (`sequence_parallel=True`: rows in, rows
out, as a model keeps them between layers), with the all-gather and the ring K/V
exchange, and reports the growth of its resident memory during the call (VmHWM after
resetting it, minus VmRSS before). cp=1 is the one-process baseline in the same run. Prints a table with the
ratio to the baseline and writes benchmarks/results/cp_memory.json. Times are
printed for information only.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distattn import AttentionConfig, NeuronAttentionBase
from distattn.parallel import ParallelGroups
from distattn.parallel.plans import split_prompt

# Llama-3-8B attention shape: 32 q / 8 kv heads of 128; fp32.
CONFIG = AttentionConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(rank: int, cp: int, seq: int, ring: bool, init: str, out: str) -> None:
    torch.set_num_threads(max(1, 2 // cp))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=cp, timeout=timedelta(seconds=600))
    groups = ParallelGroups.from_world(cp_degree=cp) if cp > 1 else ParallelGroups()
    module = NeuronAttentionBase(CONFIG, groups=groups, cp_ring=ring, sequence_parallel=True)
    x = torch.randn(1, seq, CONFIG.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).unsqueeze(0)
    mask = None
    if cp > 1:
        x, positions, mask = split_prompt(x, positions, None, groups)
    with torch.no_grad():
        small = 8 * cp  # warm-up: lazy initialisation of kernels and thread pools is not the prompt's memory
        module(torch.randn(1, small // cp, CONFIG.hidden_size), position_ids=torch.arange(small // cp).unsqueeze(0) * cp + dist.get_rank())
        dist.barrier()
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        start = time.perf_counter()
        module(x, attention_mask=mask, position_ids=positions)
        elapsed = time.perf_counter() - start
        peak = _status_kib("VmHWM")
    Path(f"{out}.{rank}").write_text(json.dumps({"rank": rank, "peak_mib": (peak - before) / 1024, "seconds": elapsed}))
    dist.destroy_process_group()


def measure(cp: int, seq: int, ring: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.start_processes(_worker, args=(cp, seq, ring, os.path.join(tmp, "init"), out), nprocs=cp, start_method="spawn")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(cp)]
    return {"cp": cp, "ring": ring, "max_rank_peak_mib": max(r["peak_mib"] for r in ranks), "seconds": max(r["seconds"] for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=8192, help="prompt length")
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4], help="cp degrees (1 = baseline)")
    args = parser.parse_args()
    rows = []
    for ring in (False, True):
        for cp in args.cps:
            if cp == 1 and ring:
                continue
            rows.append(measure(cp, args.seq, ring))
    base = next(r for r in rows if r["cp"] == 1)["max_rank_peak_mib"]
    print(f"prefill of {args.seq} tokens, Llama-3-8B attention (32/8 heads x 128), fp32, per-rank peak memory growth")
    print(f"{'cp':>3} {'K/V exchange':>13} {'peak MiB':>9} {'vs cp=1':>8} {'1/cp':>6} {'seconds':>8}")
    for r in rows:
        r["ratio_to_cp1"] = r["max_rank_peak_mib"] / base
        exchange = "-" if r["cp"] == 1 else ("ring" if r["ring"] else "all-gather")
        print(f"{r['cp']:>3} {exchange:>13} {r['max_rank_peak_mib']:>9.0f} {r['ratio_to_cp1']:>8.2f} {1 / r['cp']:>6.2f} {r['seconds']:>8.2f}")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "cp_memory.json").write_text(json.dumps({"seq": args.seq, "config": "llama3-8b-attention", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
