"""Tensor-parallel attention under torchrun: every rank holds its heads; outputs equal one process.

    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py

Each rank loads the full HF weights and keeps its shard (q/k/v rows, o_proj columns,
sinks; kv heads replicated or q heads padded as the head layout needs), keeps a KV
cache of its own kv heads only, and runs prefill, decode and speculation; o_proj
all-reduces. Rank 0 compares with the one-process module and prints the result.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

import distattn
from distattn.parallel import ParallelGroups
from tiny_gpt_oss import hf_attention, hf_config, layer_config, run_steps

PROMPTS, STEPS, SPEC = (13, 9), 12, 4
TOLERANCE = 1e-5  # fp32: the same math, only the reduction order differs


def main() -> int:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=120))
    groups = ParallelGroups.from_world()  # tp = every process
    rank = dist.get_rank()
    config = hf_config()
    weights = hf_attention(config, layer=0).state_dict()  # the same on every rank (seeded)
    cfg = layer_config(config, 0)

    sharded = distattn.NeuronAttentionBase(cfg, groups=groups, layer_idx=0, device=device)
    sharded.load_hf_state_dict({k: v.to(device) for k, v in weights.items()})
    cache = distattn.KVCacheManager.for_modules([sharded], max_batch_size=2, max_seq_len=64, speculation_width=SPEC)
    x = torch.randn(2, max(PROMPTS) + STEPS + SPEC, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(device)
    outputs = run_steps(sharded, cache, x, PROMPTS, STEPS, SPEC)
    print(f"rank {rank}: q heads {sharded.layout.q_heads}, kv heads {sharded.layout.kv_heads}, "
          f"KV cache {tuple(cache[0].k.shape)}", flush=True)

    status = 0
    if rank == 0:
        single = distattn.NeuronAttentionBase(cfg, layer_idx=0, device=device)
        single.load_hf_state_dict({k: v.to(device) for k, v in weights.items()})
        one_cache = distattn.KVCacheManager.for_modules([single], max_batch_size=2, max_seq_len=64, speculation_width=SPEC)
        expected = run_steps(single, one_cache, x, PROMPTS, STEPS, SPEC)
        worst = max((g - e).abs().max().item() for g, e in zip(outputs, expected))
        status = 0 if worst <= TOLERANCE else 1
        print(f"tp={groups.tp_size}: max |tensor parallel - one process| = {worst:.2e} "
              f"({'OK' if status == 0 else 'MISMATCH'}: bound {TOLERANCE})", flush=True)
    verdict = torch.tensor([status], device=device)
    dist.all_reduce(verdict)
    dist.destroy_process_group()
    return int(verdict.item() > 0)


if __name__ == "__main__":
    raise SystemExit(main())
