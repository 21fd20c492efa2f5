"""Loading a checkpoint: `DecoderLM.from_pretrained` beside HF's `from_pretrained` on the same files, in the same run.

    python benchmarks/load_bench.py [--tiny] [--repeats 3] [--cache-dir DIR] [--out benchmarks/results]

A TinyLlama-1.1B-shaped random bf16 checkpoint (22 layers, hidden 2048, 32 / 4 heads, intermediate 5632, vocab
32000; 2.2 GB of safetensors; `--tiny`: a 2-layer one, seconds) is saved once with `save_pretrained`. Each load runs
in a fresh process (so its peak memory is its own): HF `AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`, ours
`DecoderLM.from_pretrained(dtype=torch.bfloat16)` (packed for oneDNN on this CPU, as a user gets it) and with
`pack=False`, and ours at tp 2 under torchrun (each rank its shard). Reported: wall time of the call, and the peak
resident memory the call added (ru_maxrss after it, minus the resident memory before it), as a ratio to the
checkpoint's size (per rank at tp 2: to the bytes of the weights the rank holds, its shards plus the replicated
embeddings, norms and lm_head). HF memory-maps the file and keeps its tensors there: its resident memory counts
only the pages touched so far. Medians over `--repeats` processes; writes load_bench.json.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
TINY = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False)

# one load in this process: writes {"seconds", "peak_added_bytes", "held_bytes", "rank"} to a file of its own in the
# results folder (two ranks printing to one pipe can interleave their lines)
CHILD = r"""
import json, os, resource, sys, time
import torch
side, path, results = sys.argv[1], sys.argv[2], sys.argv[3]
if side == "hf":
    import transformers
else:
    from distattn.models import DecoderLM
    if side == "ours-tp2":
        from distattn.parallel import ParallelGroups
        from distattn.parallel.comm import init_world
        init_world("gloo")
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
tic = time.perf_counter()
if side == "hf":
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
elif side == "ours-tp2":
    model = DecoderLM.from_pretrained(path, dtype=torch.bfloat16, groups=ParallelGroups.from_world(2))
else:
    model = DecoderLM.from_pretrained(path, dtype=torch.bfloat16, pack=None if side == "ours" else False)
seconds = time.perf_counter() - tic
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # this rank's weights (dense), after the peak
rank = int(os.environ.get("RANK", 0))
with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
    json.dump({"seconds": seconds, "peak_added_bytes": peak - before, "held_bytes": held, "rank": rank}, f)
"""


def save_checkpoint(shape: dict, root: Path) -> Path:
    """The random bf16 checkpoint (saved once under `root`)."""
    import torch
    import transformers

    path = root / ("tinyllama-bf16" if shape is TINYLLAMA else "tiny-bf16")
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path


def one_load(side: str, path: Path) -> list[dict]:
    """One load in fresh processes (two ranks under torchrun for ours-tp2): each process's result."""
    ranks = 2 if side == "ours-tp2" else 1
    with tempfile.TemporaryDirectory() as folder:
        child = [sys.executable, "-c", CHILD, side, str(path), folder]
        if ranks > 1:
            child = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "--no-python", *child]
        threads = max(1, (os.cpu_count() or 1) // ranks)  # the cores shared out, as torchrun would
        done = subprocess.run(child, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        files = sorted(Path(folder).glob("rank*.json"))
        results = [json.loads(f.read_text()) for f in files]
    if done.returncode != 0 or len(results) != ranks:
        raise RuntimeError(f"{side} load failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer checkpoint (seconds; for tests)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the checkpoint is saved (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(TINY if args.tiny else TINYLLAMA, args.cache_dir or Path(tmp))
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        report: dict = {"checkpoint_bytes": size, "sides": {}}
        for side in ("hf", "ours", "ours-plain", "ours-tp2"):
            runs = [one_load(side, path) for _ in range(args.repeats)]
            share = max(r["held_bytes"] for r in runs[0]) if side == "ours-tp2" else size  # a rank's shards and replicated tensors
            seconds = statistics.median(max(r["seconds"] for r in run) for run in runs)
            peak = statistics.median(max(r["peak_added_bytes"] for r in run) for run in runs)
            report["sides"][side] = {"seconds": seconds, "peak_added_bytes": peak, "share_bytes": share, "peak_vs_share": peak / share}
        hf = report["sides"]["hf"]["seconds"]
        print(f"checkpoint {size / 1e9:.2f} GB (bf16 safetensors)")
        for side, r in report["sides"].items():
            print(f"{side:10s} {r['seconds']:6.2f} s ({r['seconds'] / hf:4.2f}x HF's time), peak +{r['peak_added_bytes'] / 1e9:.2f} GB "
                  f"({r['peak_vs_share']:.2f}x the {'rank share' if side == 'ours-tp2' else 'checkpoint'})")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load_bench.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
