"""One step object per model call: checks and host synchronisations do not repeat per layer."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from distattn import NeuronAttentionBase
from distattn.models import DecoderLM

aten = torch.ops.aten
# ops whose result the host must wait for: a value read back, or a shape that depends on data
SYNCING = {aten._local_scalar_dense, aten.equal, aten.is_nonzero, aten.nonzero, aten.masked_select, aten.unique_dim,
           aten._unique2, aten.unique_consecutive, aten.repeat_interleave}


class HostSyncs(TorchDispatchMode):
    """Counts operations that synchronise the host with the device (and `Tensor.tolist`)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func.overloadpacket in SYNCING:
            self.count += 1
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _model(tmp_path, layers: int, **overrides) -> DecoderLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **overrides)
    path = tmp_path / f"m{layers}-{overrides.get('model_type', 'llama')}"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return DecoderLM.from_pretrained(path)


def _counts(model: DecoderLM, monkeypatch) -> dict[str, int]:
    """Host syncs of a prefill, a decode step, a 3-token speculative step and a 4-token chunk (batch 2, rows at
    different positions)."""
    cache = model.new_cache(2, 64, speculation_width=3)
    tolists = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolists.append(1) or original(self))
    counts = {}
    calls = {
        "prefill": (torch.randint(0, 101, (2, 9)), torch.arange(9).expand(2, -1), torch.tensor([[True] * 9, [True] * 6 + [False] * 3])),
        "decode": (torch.randint(0, 101, (2, 1)), torch.tensor([[9], [6]]), None),
        "speculation": (torch.randint(0, 101, (2, 3)), torch.tensor([[10, 11, 12], [7, 8, 9]]), None),
        # wider than a rolling cache keeps room for: new tokens and prior keys as two kernel blocks
        "prompt chunk": (torch.randint(0, 101, (2, 4)), torch.tensor([[13, 14, 15, 16], [10, 11, 12, 13]]), None),
    }
    with torch.no_grad():
        for name, (ids, positions, mask) in calls.items():
            tolists.clear()
            with HostSyncs() as syncs:
                model(ids, position_ids=positions, cache=cache, attention_mask=mask)
            counts[name] = syncs.count + len(tolists)
    return counts


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_host_syncs_do_not_grow_with_the_number_of_layers(tmp_path, monkeypatch, family: str) -> None:
    """A model call checks its inputs once: 2 and 8 layers synchronise the host equally often."""
    extra = {"sliding_window": 4} if family == "mistral" else {}
    make = (lambda n: DecoderLM.from_pretrained(_save(tmp_path, n, family, extra))) if family == "mistral" else (lambda n: _model(tmp_path, n))
    two, eight = _counts(make(2), monkeypatch), _counts(make(8), monkeypatch)
    assert two == eight, f"{family}: host syncs per call grow with layers: 2 layers {two}, 8 layers {eight}"
    assert max(two.values()) < 20  # and there are few of them


def _save(tmp_path, layers: int, family: str, extra: dict):
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **extra)
    path = tmp_path / f"{family}{layers}"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def test_a_step_is_trusted_and_its_arguments_are_not_repeated(tmp_path) -> None:
    model = _model(tmp_path, 2)
    cache = model.new_cache(1, 16)
    layers = [NeuronAttentionBase(layer.self_attn.attn_config, layer_idx=i) for i, layer in enumerate(model.layers)]
    for ours, theirs in zip(layers, model.layers):
        ours.load_state_dict(theirs.self_attn.state_dict())
    attn = layers[0]
    x = torch.randn(1, 4, 64)
    step = attn.prepare_step(x, position_ids=torch.arange(4)[None], kv_mgr=cache, idx=0)
    with pytest.raises(TypeError, match=r"takes the call's inputs from the step; do not pass \['position_ids'\]"):
        attn(x, position_ids=torch.arange(4)[None], step=step, idx=0)
    with torch.no_grad():
        by_step = layers[1](x, step=step, idx=1).hidden_states
        cache.reset()
        alone = layers[1](x, position_ids=torch.arange(4)[None], kv_mgr=cache, idx=1).hidden_states
    assert torch.equal(by_step, alone)


def test_logits_only_where_asked(tmp_path) -> None:
    model = _model(tmp_path, 2)
    ids, pos = torch.randint(0, 101, (2, 7)), torch.arange(7).expand(2, -1)
    with torch.no_grad():
        full = model(ids, position_ids=pos, cache=model.new_cache(2, 16))
        some = model(ids, position_ids=pos, cache=model.new_cache(2, 16), logits_at=torch.tensor([[6], [3]]))
    assert some.shape == (2, 1, 101)
    assert torch.allclose(some[:, 0], full[[0, 1], [6, 3]], atol=1e-6)  # the same rows of the same matmul


def test_packed_weights_compute_what_the_plain_weights_do(tmp_path) -> None:
    """oneDNN-packed linear weights: same logits (fp32 summation order aside), dense state_dict, reloadable."""
    from distattn.runtime.generate import generate

    _model(tmp_path, 2)  # saves the checkpoint
    path = tmp_path / "m2-llama"
    plain = DecoderLM.from_pretrained(path, pack=False)
    packed = DecoderLM.from_pretrained(path, pack=True)
    assert packed.layers[0].mlp.gate_up_proj.packed is not None and packed.lm_head.packed is not None
    assert packed.layers[0].mlp.gate_up_proj.weight.stride() == (0, 0)  # the placeholder holds no data
    state, packed_state = plain.state_dict(), packed.state_dict()
    assert state.keys() == packed_state.keys() and all(torch.equal(state[k], packed_state[k]) for k in state)
    ids, pos = torch.randint(0, 101, (2, 7)), torch.arange(7).expand(2, -1)
    with torch.no_grad():
        a = plain(ids, position_ids=pos, cache=plain.new_cache(2, 16))
        b = packed(ids, position_ids=pos, cache=packed.new_cache(2, 16))
    assert (a - b).abs().max() <= 1e-5  # fp32: the blocked kernel sums in another order
    prompts = [[5, 6, 7, 8], [9, 10]]
    assert generate(plain, prompts, max_new_tokens=6).tokens == generate(packed, prompts, max_new_tokens=6).tokens
    layer = packed.layers[0].mlp.down_proj
    new = torch.randn(layer.weight.shape)
    layer.load_shard(new)  # re-packs
    assert torch.equal(layer.state_dict()["weight"], new)
    with pytest.raises(ValueError, match="this rank's shard is"):
        layer.load_shard(torch.randn(3, 3))


def test_cpu_models_are_packed_by_default_and_conversions_repack_where_they_can(tmp_path) -> None:
    """A CPU load packs bf16 weights, and fp32 ones from 256 wide; `.to(float64)` unpacks them (oneDNN packs no fp64) with
    the same numbers, `.to(bfloat16)` packs the converted weights; an unpacked model stays plain."""
    _model(tmp_path, 2)
    path = tmp_path / "m2-llama"

    def linears(model: DecoderLM) -> list:
        return [model.lm_head, model.layers[1].self_attn.qkv_proj, model.layers[1].self_attn.o_proj, model.layers[0].mlp.down_proj]

    assert all(m.packed is not None for m in linears(DecoderLM.from_pretrained(path, dtype=torch.bfloat16)))
    assert all(m.packed is None for m in linears(DecoderLM.from_pretrained(path)))  # fp32, 64 wide: plain is faster
    wide = tmp_path / "wide"
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=101, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide)
    assert DecoderLM.from_pretrained(wide).lm_head.packed is not None  # fp32 from 256 wide: packed
    model, plain = DecoderLM.from_pretrained(path, pack=True), DecoderLM.from_pretrained(path, pack=False)
    dense = {k: v.clone() for k, v in plain.state_dict().items()}
    model.to(torch.float64)
    assert all(m.packed is None and m.weight.dtype == torch.float64 and m.weight.stride() != (0, 0) for m in linears(model))
    assert all(torch.equal(v.double(), model.state_dict()[k]) for k, v in dense.items())  # fp32 -> fp64 is exact
    again = DecoderLM.from_pretrained(path, pack=True).to(torch.bfloat16)
    assert all(m.packed is not None and m.packed.dtype == torch.bfloat16 for m in linears(again))
    assert all(torch.equal(v.to(torch.bfloat16), again.state_dict()[k]) for k, v in dense.items())
    assert all(m.packed is None for m in linears(plain.to(torch.bfloat16)))
    down = plain.layers[0].mlp.down_proj  # the loader kept its reads as parameters; a caller's tensor is copied, not kept
    mine = torch.randn(down.weight.shape, dtype=down.weight.dtype)
    kept = mine.clone()
    down.load_shard(mine)
    mine.add_(1.0)
    assert torch.equal(down.weight, kept)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_decode_layers_have_static_shapes_and_no_host_sync(tmp_path, family: str) -> None:
    """With the step built, a decode or speculative step's layers read nothing back to the host and
    make no data-dependent shape: the layer stack could be captured as one graph (CUDA graphs)."""
    if family == "mistral":
        model = DecoderLM.from_pretrained(_save(tmp_path, 2, family, {"sliding_window": 4}))  # rolling caches
    else:
        model = _model(tmp_path, 2)
    cache = model.new_cache(2, 64, speculation_width=3)
    with torch.no_grad():
        model(torch.randint(0, 101, (2, 9)), position_ids=torch.arange(9).expand(2, -1), cache=cache)
        for ids, positions in ((torch.randint(0, 101, (2, 1)), torch.tensor([[9], [9]])),
                               (torch.randint(0, 101, (2, 3)), torch.tensor([[10, 11, 12], [10, 11, 12]]))):
            hidden = model.embed_tokens(ids)
            step = model.prepare_step(hidden, positions, cache)
            with HostSyncs() as syncs:
                for i, layer in enumerate(model.layers):
                    hidden = layer(hidden, step, i)
            assert syncs.count == 0, syncs.ops
