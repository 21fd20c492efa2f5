"""Bad input raises a clear error naming the argument, and leaves caches and weights untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase, RopeConfig
from distattn.hf import load_attention_weights

HIDDEN, HEADS, KV, DIM = 32, 4, 2, 8
CFG = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=DIM, learned_sinks_size=1, sliding_window=4)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"learned_sinks_size": 2}, "Learned sinks only supports learned_sinks_size == 1"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 is invalid: num_attention_heads \\(4\\) must be a multiple"),
        ({"head_dim": None, "hidden_size": 30}, "hidden_size \\(30\\) is not divisible by num_attention_heads"),
        ({"sliding_window": 0}, "sliding_window=0 is invalid"),
        ({"attention_chunk_size": 8}, "a layer is either chunked or sliding-window"),
        ({"qk_norm": "layernorm"}, "qk_norm='layernorm' is invalid"),
        ({"softmax_scale": -1.0}, "softmax_scale=-1.0 is invalid"),
        ({"clip_qkv": 0.0}, "clip_qkv=0.0 is invalid"),
        ({"attn_temperature_tuning": True}, "temperature tuning applies to NoPE layers only"),
        ({"rope": RopeConfig(partial_rotary_factor=0.375)}, "head_dim \\* factor = 3 must be even"),
    ],
)
def test_config_rejects(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**{**CFG, **fields})


def test_rope_config_rejects() -> None:
    with pytest.raises(ValueError, match="rope.original_max_position_embeddings=None is invalid"):
        RopeConfig(rope_type="yarn", factor=4.0)
    with pytest.raises(ValueError, match="rope.rope_type='dynamic' is invalid"):
        RopeConfig(rope_type="dynamic")  # type: ignore[arg-type]


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    module = NeuronAttentionBase(AttentionConfig(**CFG), layer_idx=0)
    mgr = KVCacheManager(module.config, num_layers=2, max_batch_size=2, max_seq_len=16)
    module(torch.randn(2, 5, HIDDEN), position_ids=torch.arange(5).expand(2, 5), kv_mgr=mgr)  # some content
    return module, mgr


def x(seq: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN)


def pos(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def truncated_checkpoint() -> str:
    """A checkpoint folder whose only safetensors file is cut in half (made once)."""
    import functools
    import tempfile

    @functools.lru_cache(maxsize=1)
    def make() -> str:
        from safetensors.torch import save_file

        folder = Path(tempfile.mkdtemp())
        save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, str(folder / "model.safetensors"))
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        return str(folder)

    return make()


OTHER_DIM = AttentionConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=16)

BAD_CALLS = [
    ("hidden size", lambda m, k: m(torch.randn(2, 1, 40), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "hidden_states has shape \\[2, 1, 40\\], expected \\[batch, seq, 32\\]"),
    ("hidden rank", lambda m, k: m(torch.randn(2, HIDDEN), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "hidden_states has shape"),
    ("hidden dtype", lambda m, k: m(x().double(), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "hidden_states dtype torch.float64 differs"),
    ("hidden type", lambda m, k: m([[0.0]], position_ids=pos([5], [5]), kv_mgr=k), TypeError, "hidden_states must be a tensor"),
    ("empty seq", lambda m, k: m(x(0), position_ids=torch.zeros(2, 0, dtype=torch.long), kv_mgr=k), ValueError, "must be non-empty"),
    ("head_dim mismatch", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=KVCacheManager(OTHER_DIM, num_layers=1, max_batch_size=2, max_seq_len=8)), ValueError, "kv_mgr layer cache is \\[\\*, 2, \\*, 16\\] but this layer needs \\[\\*, 2, \\*, 8\\]"),
    ("cache dtype", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=KVCacheManager(m.config, num_layers=1, max_batch_size=2, max_seq_len=8, dtype=torch.bfloat16)), ValueError, "build the KVCacheManager with dtype=torch.float32"),
    ("position beyond cache", lambda m, k: m(x(), position_ids=pos([5], [16]), kv_mgr=k), ValueError, "position_ids: position 16 is beyond the KV cache \\(max_seq_len=16\\)"),
    ("negative position", lambda m, k: m(x(), position_ids=pos([5], [-1]), kv_mgr=k), ValueError, "position_ids has negative values"),
    ("repeated position", lambda m, k: m(x(2), position_ids=pos([5, 6], [6, 6]), kv_mgr=k), ValueError, "position_ids repeats a position within a row"),
    ("position shape", lambda m, k: m(x(), position_ids=pos([5, 6], [5, 6]), kv_mgr=k), ValueError, "position_ids has shape \\[2, 2\\], expected \\[batch, seq\\] = \\[2, 1\\]"),
    ("position dtype", lambda m, k: m(x(), position_ids=pos([5.0], [5.0]), kv_mgr=k), ValueError, "position_ids dtype torch.float32 must be an integer type"),
    ("position missing", lambda m, k: m(x(), kv_mgr=k), ValueError, "position_ids is required with past_key_value or kv_mgr"),
    ("rotary positions shape", lambda m, k: m(x(), position_ids=pos([5], [5]), rotary_position_ids=pos([5, 6], [5, 6]), kv_mgr=k), ValueError, "rotary_position_ids has shape"),
    ("seq_id out of range", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, seq_ids=torch.tensor([0, 2])), ValueError, "seq_ids: \\[0, 2\\] has an id outside \\[0, 2\\)"),
    ("negative seq_id", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, seq_ids=torch.tensor([-1, 0])), ValueError, "has an id outside"),
    ("duplicate seq_ids", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, seq_ids=torch.tensor([1, 1])), ValueError, "seq_ids \\[1, 1\\] has duplicates"),
    ("seq_ids shape", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, seq_ids=torch.tensor([0, 1, 2])), ValueError, "seq_ids must be an integer tensor \\[batch\\]"),
    ("batch beyond cache", lambda m, k: m(x(batch=3), position_ids=pos([5], [5], [5]), kv_mgr=k), ValueError, "batch 3 exceeds the KVCacheManager's max_batch_size 2"),
    ("attention_mask shape", lambda m, k: m(x(), attention_mask=torch.ones(2, 6), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "attention_mask has shape \\[2, 6\\], expected \\[batch, seq\\] = \\[2, 1\\]"),
    ("attention_mask values", lambda m, k: m(x(), attention_mask=torch.full((2, 1), 2), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "attention_mask holds \\[2, 2\\]: a padding mask is bool"),
    ("active_mask shape", lambda m, k: m(x(2), active_mask=torch.ones(2, 1, 3, 3), position_ids=pos([5, 6], [5, 6]), kv_mgr=k), ValueError, "active_mask has shape \\[2, 1, 3, 3\\], expected \\[2, 1, 2, 2\\]"),
    ("residual shape", lambda m, k: m(x(), residual=torch.randn(2, 2, HIDDEN), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "residual has shape"),
    ("cos without sin", lambda m, k: m(x(), cos_cache=torch.ones(2, 1, 4), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "cos_cache and sin_cache go together"),
    ("cos width", lambda m, k: m(x(), cos_cache=torch.ones(2, 1, 3), sin_cache=torch.ones(2, 1, 3), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "cos_cache/sin_cache: last dim is 3, expected 4"),
    ("kv_mgr and past_key_value", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, past_key_value=(k[0].k, k[0].v)), ValueError, "pass either kv_mgr or past_key_value"),
    ("idx out of range", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, idx=2), ValueError, "idx=2 is not a layer of this KVCacheManager"),
    ("past_key_value shape", lambda m, k: m(x(), position_ids=pos([5], [5]), past_key_value=(torch.zeros(2, 4, 8, DIM), torch.zeros(2, 4, 8, DIM))), ValueError, "past_key_value K has shape \\[2, 4, 8, 8\\], expected \\[2, 2, len, 8\\]"),
    ("past_key_value kind", lambda m, k: m(x(), position_ids=pos([5], [5]), past_key_value=torch.zeros(2, 2, 8, DIM)), ValueError, "past_key_value must be a pair"),
    ("adapter_ids unloaded", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, adapter_ids=torch.tensor([0, 1])), ValueError, "selects LoRA adapters but none are loaded; call load_lora_adapters first"),
    ("adapter_ids shape", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, adapter_ids=torch.tensor([0, 1, 2])), ValueError, "adapter_ids must be an integer tensor \\[batch\\] = \\[2\\]"),
    ("adapter_ids range", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, adapter_ids=torch.tensor([-2, -1])), ValueError, "adapter_ids \\[-2, -1\\] selects LoRA adapters but none are loaded"),
    ("unknown kwarg", lambda m, k: m(x(), position_ids=pos([5], [5]), kv_mgr=k, layer=0), TypeError, "unexpected keyword arguments \\['layer'\\]"),
    ("unknown kernel", lambda m, k: NeuronAttentionBase(m.config, kernel="flash9", layer_idx=0).forward(x(), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "kernel='flash9' is unknown"),
    ("position device", lambda m, k: m(x(), position_ids=pos([5], [5]).to("meta"), kv_mgr=k), ValueError, "position_ids is on meta but hidden_states on cpu; move it with .to\\('cpu'\\)"),
    ("residual dtype", lambda m, k: m(x(), residual=x().double(), position_ids=pos([5], [5]), kv_mgr=k), ValueError, "residual dtype torch.float64 differs"),
    ("cache rows", lambda m, k: KVCacheManager(m.config, num_layers=1, max_batch_size=0, max_seq_len=8), ValueError, "max_batch_size=0 is invalid: pass a positive integer"),
    ("cache dp rows", lambda m, k: KVCacheManager(m.config, num_layers=1, max_batch_size=3, max_seq_len=8, dp_size=2), ValueError, "max_batch_size=3 must divide by the data-parallel degree 2"),
    ("cache layers", lambda m, k: KVCacheManager([m.config], num_layers=2, max_batch_size=2, max_seq_len=8), ValueError, "num_layers=2 but 1 configs were given"),
    ("cache kv heads", lambda m, k: KVCacheManager([m.config], n_kv_heads=[1, 2], max_batch_size=2, max_seq_len=8), ValueError, "n_kv_heads has 2 entries for 1 layers"),
    ("truncated checkpoint", lambda m, k: load_attention_weights(truncated_checkpoint(), 0), ValueError, "model.safetensors' cannot be read .*truncated or corrupt: save or copy it again"),
    ("empty checkpoint", lambda m, k: load_attention_weights(__import__("tempfile").mkdtemp(), 0), ValueError, "has no \\*.safetensors file"),
    ("checkpoint path", lambda m, k: load_attention_weights("/nonexistent/model", 0), ValueError, "is not a directory"),
    ("state dict", lambda m, k: m.load_hf_state_dict({"q_proj.weight": torch.zeros(HEADS * DIM, HIDDEN), "o_proj.weight": torch.zeros(3, 3), "rotary.inv_freq": torch.zeros(4)}), ValueError, "missing \\['k_proj.weight', .*unexpected \\['rotary.inv_freq'\\], mis-shaped \\['o_proj.weight: \\[3, 3\\] vs \\[32, 32\\]'\\]"),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_before_any_state_changes(setup, call, error, message) -> None:
    module, mgr = setup
    state = [t for layer in mgr.layers for t in (layer.k, layer.v, layer.positions)] + list(module.state_dict().values())
    before = _digest(*state)
    with pytest.raises(error, match=message):
        call(module, mgr)
    assert _digest(*state) == before


def test_the_table_is_large_enough() -> None:
    assert len(BAD_CALLS) >= 30
