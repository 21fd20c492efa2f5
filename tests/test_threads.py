"""Two modules with two KV managers, driven from two threads at once, share no hidden state."""

from __future__ import annotations

import threading

import torch

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase
from distattn.hf import hf_attention_shapes


def _run(cfg: AttentionConfig, seed: int, kernel: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    module = NeuronAttentionBase(cfg, kernel=kernel, dtype=torch.float64)
    module.load_hf_state_dict({n: 0.5 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in hf_attention_shapes(cfg).items()})
    cache = KVCacheManager.for_modules([module], max_batch_size=2, max_seq_len=80)
    x = torch.randn(2, 80, cfg.hidden_size, generator=gen, dtype=torch.float64)
    outs = [module(x[:, :10], position_ids=torch.arange(10).expand(2, -1), kv_mgr=cache, idx=0).hidden_states]
    for t in range(10, 80):
        outs.append(module(x[:, t : t + 1], position_ids=torch.full((2, 1), t), kv_mgr=cache, idx=0).hidden_states)
    return outs + [cache[0].k.clone()]


def test_two_threads_match_sequential_runs() -> None:
    jobs = [
        (AttentionConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=5, learned_sinks_size=1), 1, "sdpa"),
        (AttentionConfig(hidden_size=24, num_attention_heads=6, num_key_value_heads=3, attention_chunk_size=7, qk_norm="rmsnorm"), 2, "reference"),
    ]
    sequential = [_run(*job) for job in jobs]
    threaded: list = [None, None]

    def work(i: int) -> None:
        threaded[i] = _run(*jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for got, want in zip(threaded, sequential):
        assert got is not None and all(torch.equal(g, w) for g, w in zip(got, want))
