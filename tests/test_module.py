"""NeuronAttentionBase behaviour: caches, stages, RoPE sources, masks, output, kernels."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase, NeuronAttentionBaseOutput, RopeConfig
from distattn.kernels import AttentionSpec, available_backends, get_backend, select_backend

from tolerances import FP32, FP64

HIDDEN = 48

# backends that return the log-sum-exp run every stage (flex serves prefill only: tests/test_flex.py)
LSE_BACKENDS = [n for n in available_backends() if not getattr(get_backend(n), "fuses_sinks", False)]


def make_module(seed: int = 0, *, kernel: str = "auto", dtype=torch.float64, **fields) -> NeuronAttentionBase:
    """A layer with random weights (biases and sinks non-zero)."""
    defaults = dict(hidden_size=HIDDEN, num_attention_heads=6, num_key_value_heads=2, head_dim=8, qkv_bias=True, o_bias=True)
    defaults.update(fields)
    torch.manual_seed(seed)
    module = NeuronAttentionBase(AttentionConfig(**defaults), kernel=kernel, dtype=dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if module.config.has_sinks:  # one set of sinks for both stages, as HF checkpoints load
            module.tkg_learned_sinks.copy_(module.learned_sinks)
    return module


def recompute(module: NeuronAttentionBase, x: torch.Tensor) -> torch.Tensor:
    """Prefill over the whole sequence without a cache: the output at every position."""
    return module(x).hidden_states


def positions(batch: int, start: int, width: int) -> torch.Tensor:
    return torch.arange(start, start + width).expand(batch, width)


def test_output_unpacks_indexes_and_has_attributes() -> None:
    module = make_module()
    residual = torch.randn(2, 3, HIDDEN, dtype=torch.float64)
    out = module(torch.randn(2, 3, HIDDEN, dtype=torch.float64), residual=residual)
    assert isinstance(out, NeuronAttentionBaseOutput)
    a, kv, cos, sin = out
    assert a is out.hidden_states and kv is out.present_key_value and cos is out.cos_cache and sin is out.sin_cache
    for i, name in enumerate(["hidden_states", "present_key_value", "cos_cache", "sin_cache", "residual", "attn_input_hidden_states"]):
        assert out[i] is getattr(out, name)
    assert out[-1] is out.attn_input_hidden_states is None and out[4] is out.residual  # NxDI's six fields
    assert out.hidden_states.shape == (2, 3, HIDDEN)
    assert out.present_key_value[0].shape == (2, 2, 3, 8)  # no kv_mgr: the new tokens' K
    assert out.cos_cache.shape == (2, 3, 4)  # half tables: one angle per rotated pair
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.hidden_states = None  # type: ignore[misc]


@pytest.mark.parametrize("kernel", LSE_BACKENDS)
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"sliding_window": 4, "learned_sinks_size": 1},
        {"attention_chunk_size": 5, "learned_sinks_size": 1},
        {"qk_norm": "rmsnorm", "fused_qkv": True},
        {"qk_norm": "l2norm", "qk_norm_after_rope": True, "rope": RopeConfig(interleaved=True, partial_rotary_factor=0.5)},
        {"rope": None, "attn_temperature_tuning": True, "floor_scale": 3.0},
        {"clip_qkv": 0.5, "rope": RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)},
    ],
    ids=["causal", "window+sinks", "chunk+sinks", "qknorm+fused", "l2norm+interleaved+partial", "nope+temperature", "clip+yarn"],
)
def test_incremental_equals_recompute_over_many_wraps(kernel: str, fields: dict) -> None:
    """Prefill, 30 decode steps and speculative steps: each output equals a full recompute.

    Window 4 and chunk 5 make the rolling caches wrap around many times.
    """
    module = make_module(kernel=kernel, **fields)
    batch, prompt, steps = 2, 7, 30
    total = prompt + steps + 3 + 2
    x = torch.randn(batch, total, HIDDEN, dtype=torch.float64)
    expected = recompute(make_module(kernel="reference", **fields), x)
    mgr = KVCacheManager(module.config, num_layers=1, max_batch_size=batch, max_seq_len=total, dtype=torch.float64)
    got = [module(x[:, :prompt], position_ids=positions(batch, 0, prompt), kv_mgr=mgr, idx=0).hidden_states]
    for t in range(prompt, prompt + steps):
        got.append(module(x[:, t : t + 1], position_ids=positions(batch, t, 1), kv_mgr=mgr, idx=0).hidden_states)
    for width in (3, 2):  # speculative steps
        start = sum(g.shape[1] for g in got)
        got.append(module(x[:, start : start + width], position_ids=positions(batch, start, width), kv_mgr=mgr, idx=0).hidden_states)
    assert (torch.cat(got, dim=1) - expected).abs().max().item() <= FP64


def test_rejected_draft_tokens_are_overwritten() -> None:
    """A speculative step writes 4 tokens; only 1 is accepted; the next step rewrites the rest."""
    module = make_module(sliding_window=3, learned_sinks_size=1)
    x = torch.randn(1, 12, HIDDEN, dtype=torch.float64)
    draft = torch.randn(1, 4, HIDDEN, dtype=torch.float64)
    mgr = KVCacheManager(module.config, num_layers=1, max_batch_size=1, max_seq_len=16, speculation_width=4, dtype=torch.float64)
    assert mgr[0].cache_len == 3 + 4 - 1 and mgr[0].rolling
    module(x[:, :6], position_ids=positions(1, 0, 6), kv_mgr=mgr, idx=0)
    module(torch.cat([x[:, 6:7], draft[:, 1:]], dim=1), position_ids=positions(1, 6, 4), kv_mgr=mgr, idx=0)  # 7..9 rejected
    got = module(x[:, 7:12], position_ids=positions(1, 7, 5), kv_mgr=mgr, idx=0).hidden_states
    assert (got - recompute(module, x)[:, 7:12]).abs().max().item() <= FP64


def test_past_key_value_matches_kv_manager() -> None:
    """NxDI style: the caller keeps a static (K, V) and passes it back as past_key_value. Its slots at and after the
    new tokens' positions (no query may see them) contribute nothing whatever they hold: zeros, NaN, +-Inf."""
    module = make_module(learned_sinks_size=1)
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    first = module(x[:, :6])
    k, v = first.present_key_value  # [B, Hkv, 6, D]
    expected = recompute(module, x)[:, 6:9]
    for fill in (0.0, float("nan"), float("inf"), float("-inf")):
        pad = torch.full((2, 2, 10, 8), fill, dtype=torch.float64)
        k_cache, v_cache = torch.cat([k, pad], dim=2), torch.cat([v, pad], dim=2)  # static layout, room for more
        second = module(x[:, 6:9], position_ids=positions(2, 6, 3), past_key_value=(k_cache, v_cache))
        assert (second.hidden_states - expected).abs().max().item() <= FP64, fill


def test_seq_ids_address_cache_rows() -> None:
    module = make_module(sliding_window=4)
    x = torch.randn(2, 8, HIDDEN, dtype=torch.float64)
    mgr = KVCacheManager(module.config, num_layers=1, max_batch_size=4, max_seq_len=16, dtype=torch.float64)
    seq_ids = torch.tensor([3, 1])
    module(x[:, :5], position_ids=positions(2, 0, 5), kv_mgr=mgr, idx=0, seq_ids=seq_ids)
    untouched = (mgr[0].k[[0, 2]].clone(), mgr[0].positions[[0, 2]].clone())
    got = module(x[:, 5:8], position_ids=positions(2, 5, 3), kv_mgr=mgr, idx=0, seq_ids=seq_ids).hidden_states
    assert (got - recompute(module, x)[:, 5:8]).abs().max().item() <= FP64
    assert torch.equal(mgr[0].k[[0, 2]], untouched[0]) and torch.equal(mgr[0].positions[[0, 2]], untouched[1])
    # the row reused by a new, shorter sequence: its old entries are never seen
    y = torch.randn(1, 3, HIDDEN, dtype=torch.float64)
    module(y[:, :2], position_ids=positions(1, 0, 2), kv_mgr=mgr, idx=0, seq_ids=torch.tensor([3]))
    got = module(y[:, 2:], position_ids=positions(1, 2, 1), kv_mgr=mgr, idx=0, seq_ids=torch.tensor([3])).hidden_states
    assert (got - recompute(module, y)[:, 2:]).abs().max().item() <= FP64


def test_rows_at_different_positions_in_one_batch() -> None:
    """Continuous batching: one row decodes while another starts at a later position."""
    module = make_module(attention_chunk_size=4, learned_sinks_size=1)
    a, b = torch.randn(1, 10, HIDDEN, dtype=torch.float64), torch.randn(1, 10, HIDDEN, dtype=torch.float64)
    mgr = KVCacheManager(module.config, num_layers=1, max_batch_size=2, max_seq_len=16, dtype=torch.float64)
    module(a[:, :7], position_ids=positions(1, 0, 7), kv_mgr=mgr, idx=0, seq_ids=torch.tensor([0]))
    module(b[:, :3], position_ids=positions(1, 0, 3), kv_mgr=mgr, idx=0, seq_ids=torch.tensor([1]))
    got = module(torch.cat([a[:, 7:8], b[:, 3:4]]), position_ids=torch.tensor([[7], [3]]), kv_mgr=mgr, idx=0).hidden_states
    assert (got[0] - recompute(module, a)[0, 7:8]).abs().max().item() <= FP64
    assert (got[1] - recompute(module, b)[0, 3:4]).abs().max().item() <= FP64


def test_padding_is_not_attended_not_cached_and_gives_zero_attention() -> None:
    module = make_module(learned_sinks_size=1)
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    mgr = KVCacheManager(module.config, num_layers=1, max_batch_size=2, max_seq_len=8, dtype=torch.float64)
    out = module(x, attention_mask=mask, position_ids=positions(2, 0, 6), kv_mgr=mgr, idx=0).hidden_states
    assert (out[1, :3] - recompute(module, x[1:, :3])[0]).abs().max().item() <= FP64
    assert torch.equal(out[1, 3:], module.o_proj.bias.expand(3, -1))  # zero attention, then o_proj's bias
    assert mgr[0].positions[1].tolist() == [0, 1, 2, -1, -1, -1, -1, -1]


def test_active_mask_restricts_among_new_tokens() -> None:
    """A tree draft: token 2 must not see token 1; equivalent to leaving token 1 out."""
    module = make_module(learned_sinks_size=1)
    x = torch.randn(1, 8, HIDDEN, dtype=torch.float64)
    mgr = KVCacheManager(module.config, num_layers=1, max_batch_size=1, max_seq_len=16, dtype=torch.float64)
    module(x[:, :5], position_ids=positions(1, 0, 5), kv_mgr=mgr, idx=0)
    tree = torch.ones(3, 3, dtype=torch.bool).tril()
    tree[2, 1] = False
    got = module(x[:, 5:8], position_ids=positions(1, 5, 3), active_mask=tree.view(1, 1, 3, 3), kv_mgr=mgr, idx=0, update_kv_per_layer=False)
    skip = module(x[:, [5, 7]], position_ids=torch.tensor([[5, 7]]), kv_mgr=mgr, idx=0, update_kv_per_layer=False)
    assert (got.hidden_states[:, 2] - skip.hidden_states[:, 1]).abs().max().item() <= FP64
    assert (got.hidden_states[:, :2] - recompute(module, x)[:, 5:7]).abs().max().item() <= FP64


def test_prefill_and_decode_use_their_own_sinks() -> None:
    module = make_module(learned_sinks_size=1)
    with torch.no_grad():
        module.tkg_learned_sinks.copy_(module.learned_sinks + 3.0)
    twin = make_module(learned_sinks_size=1)  # the same weights, prefill sinks := decode sinks
    with torch.no_grad():
        twin.learned_sinks.copy_(module.tkg_learned_sinks)
    x = torch.randn(1, 6, HIDDEN, dtype=torch.float64)
    mgr = KVCacheManager(module.config, num_layers=1, max_batch_size=1, max_seq_len=8, dtype=torch.float64)
    pre = module(x[:, :5], position_ids=positions(1, 0, 5), kv_mgr=mgr, idx=0).hidden_states
    dec = module(x[:, 5:], position_ids=positions(1, 5, 1), kv_mgr=mgr, idx=0).hidden_states
    assert (pre - recompute(module, x[:, :5])).abs().max().item() <= FP64
    assert (dec - recompute(twin, x)[:, 5:]).abs().max().item() <= FP64
    assert (dec - recompute(module, x)[:, 5:]).abs().max().item() > 1e-3  # the decode sinks made a difference


def test_rope_from_module_from_tables_and_builtin_agree() -> None:
    """HF's rotary module (duplicated cos/sin), passed tables, and our own tables give one result."""
    hf_cfg = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    builtin = make_module(dtype=torch.float32)
    with_module = make_module(dtype=torch.float32)
    with_module.rotary_emb = rotary
    x = torch.randn(2, 5, HIDDEN)
    pos = positions(2, 3, 5)
    ref = builtin(x, position_ids=pos)
    via_module = with_module(x, position_ids=pos)
    via_tables = builtin(x, position_ids=pos, cos_cache=ref.cos_cache, sin_cache=ref.sin_cache)
    assert (via_module.hidden_states - ref.hidden_states).abs().max().item() <= FP32
    assert torch.equal(via_tables.hidden_states, ref.hidden_states)
    assert via_module.cos_cache.shape == (2, 5, 8)  # returned as the module made them, for the next layer
    # rotary_position_ids drive RoPE independently of the mask positions
    shifted = builtin(x, position_ids=pos, rotary_position_ids=pos * 2)  # not a uniform shift: RoPE is relative
    assert (shifted.hidden_states - ref.hidden_states).abs().max().item() > 1e-3


def test_rmsnorm_and_residual() -> None:
    module = make_module()
    norm = torch.nn.RMSNorm(HIDDEN, dtype=torch.float64)
    x, r = torch.randn(1, 4, HIDDEN, dtype=torch.float64), torch.randn(1, 4, HIDDEN, dtype=torch.float64)
    out = module(x, rmsnorm=norm, residual=r)
    assert torch.equal(out.residual, x + r)
    assert torch.equal(out.hidden_states, module(norm(x + r)).hidden_states)


def test_from_nxdi_converts_the_softmax_scale_divisor() -> None:
    module = NeuronAttentionBase.from_nxdi(hidden_size=64, num_attention_heads=4, softmax_scale=8.0)
    assert module.attn_config.scale == pytest.approx(1 / 8)
    assert NeuronAttentionBase.from_nxdi(hidden_size=64, num_attention_heads=4).attn_config.scale == pytest.approx(16**-0.5)


def test_kernel_selection_explains_itself() -> None:
    q = torch.empty(1, 2, 1, 8, device="meta")
    spec = AttentionSpec(scale=1.0)
    assert select_backend("auto", q, q, spec).name == "reference"  # sdpa has no meta kernel
    with pytest.raises(ValueError, match="kernel='sdpa' cannot run this call: device type 'meta'"):
        select_backend("sdpa", q, q, spec)
    with pytest.raises(ValueError, match="kernel='flash9' is unknown"):
        make_module(kernel="flash9")(torch.randn(1, 2, HIDDEN, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# relative to the outputs' largest: fp32 sums in another order (no TF32); bf16 rounds weights and activations (2^-9 each)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_cuda_sdpa_matches_reference(dtype, tol) -> None:
    module = make_module(kernel="sdpa", sliding_window=5, learned_sinks_size=1).to("cuda", dtype)  # the reference's weights, rounded
    ref = make_module(kernel="reference", dtype=torch.float64, sliding_window=5, learned_sinks_size=1)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    mgr = KVCacheManager(module.config, num_layers=1, max_batch_size=2, max_seq_len=32, dtype=dtype, device="cuda")
    got = [module(x[:, :15].to("cuda", dtype), position_ids=positions(2, 0, 15).cuda(), kv_mgr=mgr, idx=0).hidden_states]
    for t in range(15, 19):
        got.append(module(x[:, t : t + 1].to("cuda", dtype), position_ids=positions(2, t, 1).cuda(), kv_mgr=mgr, idx=0).hidden_states)
    want = recompute(ref, x)
    assert (torch.cat(got, 1).double().cpu() - want).abs().max().item() <= tol * want.abs().max().item()


def test_uneven_speculative_widths_padded_in_every_row() -> None:
    """Rows draft different numbers of tokens; padding fills the rest; an idle row is all padding."""
    module = make_module(sliding_window=5, learned_sinks_size=1)
    seqs = [torch.randn(1, 12, HIDDEN, dtype=torch.float64) for _ in range(3)]
    mgr = KVCacheManager(module.config, num_layers=1, max_batch_size=3, max_seq_len=16, speculation_width=3, dtype=torch.float64)
    module(torch.cat([s[:, :8] for s in seqs]), position_ids=positions(3, 0, 8), kv_mgr=mgr, idx=0)
    idle_before = (mgr[0].k[2].clone(), mgr[0].positions[2].clone())
    step = torch.cat([s[:, 8:11] for s in seqs])
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    got = module(step, attention_mask=valid, position_ids=positions(3, 8, 3), kv_mgr=mgr, idx=0).hidden_states
    assert (got[0, :2] - recompute(module, seqs[0])[0, 8:10]).abs().max().item() <= FP64
    assert (got[1, :1] - recompute(module, seqs[1])[0, 8:9]).abs().max().item() <= FP64
    assert torch.equal(got[2], module.o_proj.bias.expand(3, -1))  # idle row: zero attention
    assert torch.equal(mgr[0].k[2], idle_before[0]) and torch.equal(mgr[0].positions[2], idle_before[1])
