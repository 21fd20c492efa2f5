"""Context-parallel prefill, then data-parallel decode, under torchrun; checked against one process.

    torchrun --standalone --nproc-per-node 4 examples/context_data_parallel.py --cp 2 --dp 2

Over tp = all ranks: prefill splits each prompt across `--cp` ranks (attention-TP
groups of tp / cp ranks split the heads), then decode splits the batch across `--dp`
replicas (each holds only its sequences' KV cache). Every rank also runs the
one-process module and compares; rank 0 prints the verdict. Works across machines
too: `torchrun --nnodes 2 --node-rank N --master-addr HOST --master-port PORT ...`.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import torch
import torch.distributed as dist

import distattn
from distattn.parallel import ParallelGroups
from tiny_gpt_oss import hf_attention, hf_config, layer_config

PROMPTS = (13, 6, 9, 4)  # four sequences, none a multiple of 2 * cp
TOLERANCE = 1e-5  # fp32: the same math, other summation order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cp", type=int, default=2, help="context-parallel degree of prefill")
    parser.add_argument("--dp", type=int, default=2, help="data-parallel degree of decode")
    parser.add_argument("--steps", type=int, default=16, help="decode steps")
    parser.add_argument("--layer", type=int, default=0, help="0: sliding window 8, 1: full attention")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    groups = ParallelGroups.from_world(cp_degree=args.cp, dp_degree=args.dp)
    config = hf_config()
    weights = hf_attention(config, args.layer).state_dict()  # the same on every rank (seeded)
    cfg = layer_config(config, args.layer)
    modules = {
        "parallel": distattn.NeuronAttentionBase(cfg, groups=groups, layer_idx=0),
        "one process": distattn.NeuronAttentionBase(cfg, layer_idx=0),
    }
    caches = {}
    for name, module in modules.items():
        module.load_hf_state_dict(weights)
        caches[name] = distattn.KVCacheManager.for_modules([module], max_batch_size=len(PROMPTS), max_seq_len=64)
    x = torch.randn(len(PROMPTS), 64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))

    worst = 0.0

    def step(seq_ids: list[int], starts: list[int], width: int, valid: torch.Tensor | None = None) -> None:
        nonlocal worst
        pos = torch.tensor(starts).unsqueeze(1) + torch.arange(width)
        hidden = torch.stack([x[s, pos[b]] for b, s in enumerate(seq_ids)])
        outs = [
            modules[name](hidden, attention_mask=valid, position_ids=pos, kv_mgr=caches[name], seq_ids=torch.tensor(seq_ids)).hidden_states
            for name in modules
        ]
        mask = torch.ones(len(seq_ids), width, 1) if valid is None else valid.unsqueeze(-1)
        worst = max(worst, ((outs[0] - outs[1]) * mask).abs().max().item())

    width = max(PROMPTS)
    step([0, 1, 2, 3], [0] * 4, width, torch.arange(width).expand(4, width) < torch.tensor(PROMPTS).unsqueeze(1))
    lengths = list(PROMPTS)
    order = [1, 0, 3, 2]  # continuous batching: any order within each replica's range
    for _ in range(args.steps):
        step(order, [lengths[s] for s in order], 1)
        for s in order:
            lengths[s] += 1
    status = torch.tensor([0 if worst <= TOLERANCE else 1])
    dist.all_reduce(status)
    if dist.get_rank() == 0:
        print(f"tp={groups.tp_size} cp={groups.cp_size} dp={groups.dp_size}: prefill {PROMPTS} + {args.steps} decode steps, "
              f"max |parallel - one process| on rank 0 = {worst:.2e} ({'OK' if int(status) == 0 else 'MISMATCH'}: bound {TOLERANCE})",
              flush=True)
    dist.destroy_process_group()
    return int(status.item() > 0)


if __name__ == "__main__":
    raise SystemExit(main())
