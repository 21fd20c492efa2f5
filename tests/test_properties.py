"""Property tests: random layers and schedules against the fp64 reference layer.

CI runs the "ci" hypothesis profile (300 derandomised examples); `python
benchmarks/soak.py` runs the same property far longer.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase, RopeConfig
from distattn.hf import hf_attention_shapes
from distattn.kernels import available_backends, get_backend

from layer_reference import reference_layer
from tolerances import FP64

# backends that return the log-sum-exp run every stage (flex serves prefill only: tests/test_flex.py)
LSE_BACKENDS = [n for n in available_backends() if not getattr(get_backend(n), "fuses_sinks", False)]


@st.composite
def layers(draw) -> tuple[AttentionConfig, str]:
    n_kv = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 12]))
    route = draw(st.sampled_from(["causal", "window", "chunk"]))
    rope = draw(st.sampled_from([RopeConfig(), RopeConfig(interleaved=True, partial_rotary_factor=0.5), None]))
    cfg = AttentionConfig(
        hidden_size=draw(st.sampled_from([12, 16])),
        num_attention_heads=n_kv * draw(st.integers(1, 3)),
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        qkv_bias=draw(st.booleans()),
        o_bias=draw(st.booleans()),
        fused_qkv=draw(st.booleans()),
        learned_sinks_size=draw(st.sampled_from([None, 1])),
        sliding_window=draw(st.integers(1, 6)) if route == "window" else None,
        attention_chunk_size=draw(st.integers(1, 6)) if route == "chunk" else None,
        qk_norm=draw(st.sampled_from([None, "rmsnorm", "l2norm"])),
        qk_norm_after_rope=draw(st.booleans()),
        clip_qkv=draw(st.sampled_from([None, 0.7])),
        rope=rope,
        attn_temperature_tuning=rope is None and draw(st.booleans()),
        floor_scale=3.0,
    )
    return cfg, draw(st.sampled_from(LSE_BACKENDS))


@st.composite
def schedules(draw) -> tuple[list[int], int, list[int]]:
    """(prompt length per row, decode steps, speculative step widths)."""
    prompts = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
    return prompts, draw(st.integers(0, 6)), draw(st.lists(st.integers(2, 4), max_size=2))


@given(layer=layers(), schedule=schedules(), seed=st.integers(0, 2**16))
def test_incremental_layer_equals_fp64_reference(layer, schedule, seed) -> None:
    cfg, kernel = layer
    prompts, steps, specs = schedule
    gen = torch.Generator().manual_seed(seed)
    weights = {n: 0.4 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in hf_attention_shapes(cfg).items()}
    module = NeuronAttentionBase(cfg, kernel=kernel, dtype=torch.float64)
    module.load_hf_state_dict(weights)
    batch = len(prompts)
    total = max(prompts) + steps + sum(specs)
    x = torch.randn(batch, total, cfg.hidden_size, generator=gen, dtype=torch.float64)
    expected = reference_layer(cfg, weights, x, torch.arange(total).expand(batch, total))
    cache = KVCacheManager.for_modules([module], max_batch_size=batch, max_seq_len=total, speculation_width=max(specs, default=1))
    lengths = [0] * batch
    for widths in [prompts] + [[1] * batch] * steps + [[w] * batch for w in specs]:
        seq = max(widths)
        pos = torch.tensor(lengths).unsqueeze(1) + torch.arange(seq)
        valid = torch.arange(seq).expand(batch, seq) < torch.tensor(widths).unsqueeze(1)
        hidden = torch.stack([x[b, pos[b].clamp(max=total - 1)] for b in range(batch)])
        out = module(hidden, attention_mask=valid, position_ids=pos, kv_mgr=cache, idx=0).hidden_states
        for b in range(batch):
            want = expected[b, lengths[b] : lengths[b] + widths[b]]
            assert (out[b, : widths[b]] - want).abs().max().item() <= FP64
        lengths = [n + w for n, w in zip(lengths, widths)]
