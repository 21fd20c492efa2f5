"""10,000 decode steps on a rolling window cache stay equal to a recompute from scratch."""

from __future__ import annotations

import torch

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase
from distattn.hf import hf_attention_shapes

from layer_reference import reference_layer
from tolerances import FP64

STEPS = 10_000
WINDOW = 7


@torch.no_grad()
def test_ten_thousand_decode_steps_on_a_rolling_cache() -> None:
    cfg = AttentionConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, sliding_window=WINDOW,
                          learned_sinks_size=1, qkv_bias=True, o_bias=True)
    gen = torch.Generator().manual_seed(0)
    weights = {n: 0.5 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in hf_attention_shapes(cfg).items()}
    module = NeuronAttentionBase(cfg, dtype=torch.float64)
    module.load_hf_state_dict(weights)
    cache = KVCacheManager.for_modules([module], max_batch_size=2, max_seq_len=STEPS + 1)
    assert cache[0].cache_len == WINDOW  # memory stays at the window, whatever the length
    x = torch.randn(2, STEPS, cfg.hidden_size, generator=gen, dtype=torch.float64)
    sampled = set(range(0, STEPS, 613)) | set(range(STEPS - 2 * WINDOW, STEPS))  # every slot offset, and the end
    worst = 0.0
    for t in range(STEPS):
        out = module(x[:, t : t + 1], position_ids=torch.full((2, 1), t), kv_mgr=cache, idx=0).hidden_states
        if t in sampled:  # recompute from the raw inputs: the window's tokens at their true positions
            start = max(0, t - WINDOW + 1)
            positions = torch.arange(start, t + 1).expand(2, -1)
            expected = reference_layer(cfg, weights, x[:, start : t + 1], positions)[:, -1:]
            worst = max(worst, (out - expected).abs().max().item())
    assert worst <= FP64
    assert sorted(cache[0].positions[0].tolist()) == list(range(STEPS - WINDOW, STEPS))
