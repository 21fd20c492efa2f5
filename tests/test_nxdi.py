"""NxDI's own model code on distattn: constructor keywords, configs, masks, decoder layers.

The attention classes in `nxdi_ports.py` are written as NxDI's model files write them,
with `neuronx_distributed_inference` replaced by `distattn.nxdi`; every check compares
them with HF transformers' modules (random weights, tiny configs) or with the
fp64 reference layer.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from distattn import KVCacheManager
from distattn import NeuronAttentionBase as OurBase
from distattn.nxdi.models.config import InferenceConfig, NeuronConfig, to_dict
from distattn.nxdi.modules.attention.attention_base import NeuronAttentionBase, QKNormPlacement
from distattn.nxdi.modules.custom_calls import CustomRMSNorm
from distattn.nxdi.utils.hf_adapter import load_pretrained_config

from hf_reference import FAMILIES, build_model, family_config, trace
from layer_reference import reference_layer
from nxdi_ports import NeuronLlamaDecoderLayer, build_port, forward_kwargs
from test_hf_parity import PROMPTS, _sequences, run_incremental
from tolerances import FP32_VS_HF, FP64

# NxDI's Llama 4 attention applies no temperature tuning on NoPE layers; with the
# checkpoint default floor_scale (8192) HF's tuning is 1 at every tested position.
OVERRIDES = {"llama4": {"floor_scale": 8192}}


def _fp32() -> NeuronConfig:
    return NeuronConfig(torch_dtype=torch.float32)


def port_error(family: str, neuron_config: NeuronConfig) -> tuple[float, float]:
    """Max |ours - HF| over prefill, 20 decode steps and a 4-token speculative step (batch 2), and HF's scale."""
    model = build_model(family, **OVERRIDES.get(family, {}))
    seqs = _sequences(model.config.vocab_size, seed=1)
    traces = [trace(model, ids) for ids in seqs]
    config, modules = build_port(family, model, neuron_config)
    extras = [forward_kwargs(family, config, i) for i in range(len(modules))]
    ours = run_incremental(modules, [t.inputs for t in traces], torch.float32, extras)
    err = max((ours[b][i].double() - ref[0].double()).abs().max().item() for b, t in enumerate(traces) for i, ref in enumerate(t.outputs))
    scale = max(ref.abs().max().item() for t in traces for ref in t.outputs)
    return err, scale


@pytest.mark.parametrize("family", FAMILIES)
def test_nxdi_attention_subclass_matches_hf(family: str) -> None:
    """Each family's NxDI-style subclass, built from an NxDI config of a tiny HF config, equals HF (tp 1)."""
    err, scale = port_error(family, _fp32())
    assert scale > 0.5, "outputs too small for the comparison to mean anything"
    assert err <= FP32_VS_HF, f"{family}: max abs diff {err:.3g}"


def test_the_ports_use_what_each_family_needs() -> None:
    """The subclasses exercise the NxDI features the issue lists (so the parity above covers them)."""
    built = {}
    for family in FAMILIES:
        model = build_model(family, **OVERRIDES.get(family, {}))
        built[family] = build_port(family, model, _fp32())[1]
    assert built["llama"][0].attn_config.qkv_bias and type(built["llama"][0].rotary_emb).__name__ == "Llama3RotaryEmbedding"
    assert built["qwen2"][0].attn_config.qkv_bias and not built["qwen2"][0].attn_config.o_bias
    assert isinstance(built["qwen3"][0].q_layernorm, CustomRMSNorm) and built["qwen3"][0].q_layernorm.weight is not None
    assert built["mistral"][0].attn_config.sliding_window == 8
    gpt = built["gpt_oss"]
    assert gpt[0].attn_config.has_sinks and gpt[0].attn_config.sliding_window == 8 and gpt[1].attn_config.sliding_window is None
    gemma = built["gemma3"]
    assert gemma[0].attn_config.scale == pytest.approx(24**-0.5) and gemma[0].attn_config.sliding_window == 8
    llama4 = built["llama4"]
    assert [m.attn_config.attention_chunk_size for m in llama4] == [8, 8, 8, None]  # layer 3 is NoPE
    assert llama4[0].nxdi.polar_rope and llama4[0].nxdi.use_qk_norm and llama4[0].attn_config.rope.interleaved


def test_self_config_is_the_inference_config_and_the_module_follows_torch_dtype() -> None:
    model = build_model("qwen3")
    config, modules = build_port("qwen3", model, NeuronConfig())  # NxDI's default torch_dtype: bfloat16
    module = modules[0]
    assert module.config is config and module.neuron_config is config.neuron_config
    assert module.attn_config.hidden_size == config.hidden_size
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert module.num_heads == 4 and module.num_key_value_heads == 2 and module.head_dim == 16
    mgr = KVCacheManager.for_modules(modules, max_batch_size=1, max_seq_len=16)
    assert mgr.layer(0).k.dtype == torch.bfloat16
    x = torch.randn(1, 5, 64)  # fp32 in: NxDI casts to the layer's dtype and back
    out = module(x, position_ids=torch.arange(5)[None], kv_mgr=mgr, idx=0)
    assert out.hidden_states.dtype == torch.float32


def test_transformers4_rope_names_and_config_helpers() -> None:
    gemma = InferenceConfig(_fp32(), load_config=load_pretrained_config(hf_config=family_config("gemma3")))
    assert gemma.rope_theta == 1000000.0 and gemma.rope_local_base_freq == 10000.0 and gemma.rope_scaling is None
    llama = InferenceConfig(_fp32(), load_config=load_pretrained_config(hf_config=family_config("llama")))
    assert llama.rope_theta == 10000.0 and llama.rope_scaling["rope_type"] == "llama3" and llama.rope_scaling["factor"] == 8.0
    assert to_dict(llama)["neuron_config"]["torch_dtype"] == "float32"

    class Aliased(InferenceConfig):
        attribute_map = {"n_heads": "num_attention_heads"}

        def add_derived_config(self) -> None:
            self.num_cores_per_group = 1

        def get_required_attributes(self) -> list[str]:
            return ["num_attention_heads", "hidden_size"]

    cfg = Aliased(_fp32(), n_heads=4, hidden_size=64)
    assert cfg.num_attention_heads == 4 and cfg.n_heads == 4 and cfg.num_cores_per_group == 1
    with pytest.raises(ValueError, match=r"Config must define \['hidden_size'\]"):
        Aliased(_fp32(), n_heads=4)


def test_load_pretrained_config_reads_a_saved_checkpoint(tmp_path) -> None:
    model = build_model("mistral")
    model.save_pretrained(tmp_path)
    cfg = InferenceConfig(_fp32(), load_config=load_pretrained_config(tmp_path))
    assert cfg.sliding_window == 8 and cfg.rope_theta == model.config.rope_parameters["rope_theta"] and cfg._name_or_path == str(tmp_path)
    with pytest.raises(ValueError, match="is not a directory with a config.json"):
        InferenceConfig(_fp32(), load_config=load_pretrained_config(tmp_path / "missing"))


# ---- the quick reference of the NxDI summary, as written --------------------------------------


def test_quick_reference_calls_run_as_written() -> None:
    torch.manual_seed(0)
    config = InferenceConfig(_fp32())
    hidden_size, num_attention_heads = 64, 4
    for attention in (
        NeuronAttentionBase(config, hidden_size, num_attention_heads),
        NeuronAttentionBase(config, hidden_size, num_attention_heads, learned_sinks_size=1),
        NeuronAttentionBase(config, hidden_size, num_attention_heads, qkv_bias=True, o_bias=True),
    ):
        weights = _random_weights(attention)
        cfg = attention.attn_config
        hidden_states, position_ids = torch.randn(2, 6, hidden_size), torch.arange(6).expand(2, -1)
        attention_mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()  # NxDI's context-encoding mask
        output = attention(hidden_states, attention_mask, position_ids)
        attn_out, kv = output.hidden_states, output.present_key_value
        expected = reference_layer(cfg, weights, hidden_states.double(), position_ids).float()
        assert (attn_out - expected).abs().max() <= 1e-5  # fp32 vs the fp64 reference
        # token generation over the returned cache, as the summary writes it
        token, pos = torch.randn(2, 1, hidden_size), torch.tensor([[6], [6]])
        output = attention(token, past_key_value=kv, position_ids=pos, active_mask=torch.ones(2, 1, 1, 1, dtype=torch.bool))
        cache = output.present_key_value
        assert cache[0].shape == (2, cfg.n_kv_heads, 1, cfg.head_dim)
        full = reference_layer(cfg, weights, torch.cat([hidden_states, token], 1).double(), torch.arange(7).expand(2, -1)).float()
        assert (output.hidden_states - full[:, 6:]).abs().max() <= 1e-5


def _random_weights(module: OurBase) -> dict[str, torch.Tensor]:
    """Random HF-named weights loaded into the module; returned in fp64 for the reference."""
    from distattn.hf import hf_attention_shapes

    gen = torch.Generator().manual_seed(1)
    weights = {n: 0.2 * torch.randn(s, generator=gen) for n, s in hf_attention_shapes(module.attn_config).items()}
    module.load_hf_state_dict(weights)
    return {n: w.double() for n, w in weights.items()}


# ---- a decoder layer written the NxDI way ----------------------------------------------------


@pytest.mark.parametrize("qkv_kernel_enabled", [False, True], ids=["layer-norms", "qkv-step-norms"])
def test_nxdi_decoder_layer_matches_hf_decoder_layer(qkv_kernel_enabled: bool) -> None:
    """NxDI's Llama decoder layer (tuple unpacking, 4-D masks, past_key_value kept by the caller as NxDI's
    model base does) equals HF's LlamaDecoderLayer on a right-padded batch: prefill, then decode steps."""
    model = build_model("llama")
    neuron_config = NeuronConfig(torch_dtype=torch.float32, qkv_kernel_enabled=qkv_kernel_enabled)
    config = InferenceConfig(neuron_config, load_config=load_pretrained_config(hf_config=model.config))
    config.num_cores_per_group = 1
    layers = []
    for hf_layer in model.model.layers:
        layer = NeuronLlamaDecoderLayer(config)
        layer.load_hf_state_dict(hf_layer.state_dict())
        layers.append(layer)
    seqs = _sequences(model.config.vocab_size, seed=3)
    refs = [_decoder_trace(model, ids) for ids in seqs]  # per sequence: layer inputs and outputs [1, T, hidden]
    lengths, steps, cache_len = list(PROMPTS), 6, 32
    batch, prompt = len(lengths), max(lengths)
    err = 0.0
    caches = [None] * len(layers)
    # context encoding: right padding, NxDI's causal [B, 1, S, S] mask
    mask = torch.ones(prompt, prompt, dtype=torch.bool).tril().expand(batch, 1, prompt, prompt)
    positions = torch.arange(prompt).expand(batch, -1)
    for i, layer in enumerate(layers):
        x = torch.zeros(batch, prompt, 64)
        for b, n in enumerate(lengths):
            x[b, :n] = refs[b][0][i][0, :n]
        hidden, (k, v), cos, sin, _ = layer(x, attention_mask=mask, position_ids=positions)
        caches[i] = (torch.zeros(batch, k.shape[1], cache_len, k.shape[3]), torch.zeros(batch, v.shape[1], cache_len, v.shape[3]))
        caches[i][0][:, :, :prompt], caches[i][1][:, :, :prompt] = k, v  # the model base writes the cache
        for b, n in enumerate(lengths):
            err = max(err, (hidden[b, :n] - refs[b][1][i][0, :n]).abs().max().item())
    # token generation: [B, 1, 1, L] mask over the cache (slots before each row's position)
    for step in range(steps):
        pos = torch.tensor([[n + step] for n in lengths])
        mask = (torch.arange(cache_len)[None, :] < pos).view(batch, 1, 1, cache_len)
        for i, layer in enumerate(layers):
            x = torch.stack([refs[b][0][i][0, pos[b, 0]] for b in range(batch)])[:, None]
            hidden, (k, v), _, _, _ = layer(x, attention_mask=mask, position_ids=pos, past_key_value=caches[i])
            for b in range(batch):
                caches[i][0][b, :, pos[b, 0]], caches[i][1][b, :, pos[b, 0]] = k[b, :, 0], v[b, :, 0]
                err = max(err, (hidden[b, 0] - refs[b][1][i][0, pos[b, 0]]).abs().max().item())
    assert err <= FP32_VS_HF, f"decoder layer max abs diff {err:.3g}"


def _decoder_trace(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    inputs, outputs, handles = [], [], []
    for layer in model.model.layers:
        def hook(mod, args, kwargs, out) -> None:
            inputs.append((kwargs.get("hidden_states", args[0] if args else None)).detach().clone())
            outputs.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


# ---- NxDI's meaning of rmsnorm / residual, masks and extras ------------------------------------


def test_rmsnorm_and_residual_reach_the_qkv_step_only_with_the_qkv_kernel() -> None:
    torch.manual_seed(0)
    norm = CustomRMSNorm(64)
    x, r = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    plain = NeuronAttentionBase(InferenceConfig(_fp32()), 64, 4)
    out = plain(x, rmsnorm=norm, residual=r)
    assert out.residual is r  # returned unchanged: the decoder layer adds it
    assert torch.equal(out.hidden_states, plain(x).hidden_states)  # rmsnorm not applied
    fused = NeuronAttentionBase(InferenceConfig(NeuronConfig(torch_dtype=torch.float32, qkv_kernel_enabled=True)), 64, 4)
    fused.load_state_dict(plain.state_dict())
    out = fused(x, rmsnorm=norm, residual=r)
    assert torch.equal(out.residual, x + r)
    assert torch.equal(out.hidden_states, plain(norm(x + r)).hidden_states)


def test_4d_masks_restrict_keys_like_nxdi() -> None:
    """A context-encoding mask that hides key 0 and a token-generation mask that hides prior slot 1
    give the reference output computed without those keys."""
    torch.manual_seed(0)
    attn = NeuronAttentionBase.from_nxdi(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, dtype=torch.float64)
    weights = _random_weights(attn)
    x = torch.randn(1, 6, 64, dtype=torch.float64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    hide0 = causal.clone()
    hide0[1:, 0] = False
    out, (k, v), _, _ = attn(x, attention_mask=hide0.view(1, 1, 6, 6))
    ref_rest = reference_layer(attn.attn_config, weights, x[:, 1:], torch.arange(1, 6)[None])
    assert (out[:, 1:] - ref_rest).abs().max() <= FP64
    kc, vc = torch.zeros(1, 2, 8, 16, dtype=torch.float64), torch.zeros(1, 2, 8, 16, dtype=torch.float64)
    _, (k, v), _, _ = attn(x, attention_mask=causal.view(1, 1, 6, 6))
    kc[:, :, :6], vc[:, :, :6] = k, v
    token = torch.randn(1, 1, 64, dtype=torch.float64)
    tkg_mask = (torch.arange(8) < 6).view(1, 1, 1, 8).clone()
    tkg_mask[..., 1] = False
    out = attn(token, attention_mask=tkg_mask, position_ids=torch.tensor([[6]]), past_key_value=(kc, vc)).hidden_states
    keep = [0, 2, 3, 4, 5]
    seq = torch.cat([x[:, keep], token], 1)
    ref = reference_layer(attn.attn_config, weights, seq, torch.tensor([keep + [6]]))[:, -1:]
    assert (out - ref).abs().max() <= FP64


def test_llama4_rope_follows_use_polar_compatible_rope() -> None:
    """NxDI's Llama 4 layers get RoPE per call: with use_polar_compatible_rope=True interleaved RoPE
    from rope_theta, without it none (NoPE layers), as the reference layer computes each."""
    torch.manual_seed(0)
    attn = NeuronAttentionBase.from_nxdi(hidden_size=64, num_attention_heads=4, rope_theta=10000.0, dtype=torch.float64)
    weights = _random_weights(attn)
    x, pos = torch.randn(1, 5, 64, dtype=torch.float64), torch.arange(5)[None]
    roped = attn(x, use_polar_compatible_rope=True).hidden_states
    assert (roped - reference_layer(attn.attn_config, weights, x, pos)).abs().max() <= FP64
    import dataclasses

    nope = dataclasses.replace(attn.attn_config, rope=None)
    assert (attn(x).hidden_states - reference_layer(nope, weights, x, pos)).abs().max() <= FP64


# ---- errors and the log line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "error", "message"),
    [
        ({"learned_sinks_size": 2}, ValueError, "Learned sinks only supports learned_sinks_size == 1"),
        ({"q_layernorm": CustomRMSNorm(16)}, ValueError, "q_layernorm and k_layernorm must both be set or both be None"),
        ({"use_qk_norm": True}, ValueError, "use QKNormPlacement.POST_ROPE"),
        ({"sequence_parallel_enabled": True}, ValueError, "set neuron_config.sequence_parallel_enabled=False"),
        ({"softmax_scale": 0.0}, ValueError, "softmax_scale=0.0 is invalid"),
        ({"flash_attention": True}, TypeError, r"unexpected keyword arguments \['flash_attention'\]"),
        ({"qk_norm_placement": "post"}, ValueError, "use QKNormPlacement.PRE_ROPE or POST_ROPE"),
    ],
)
def test_nxdi_constructor_errors(keywords: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        NeuronAttentionBase(InferenceConfig(_fp32()), hidden_size=64, num_attention_heads=4, **keywords)


def test_constructor_form_errors() -> None:
    with pytest.raises(TypeError, match="config must be a distattn.AttentionConfig or an NxDI-style InferenceConfig"):
        NeuronAttentionBase({"hidden_size": 64}, hidden_size=64, num_attention_heads=4)
    with pytest.raises(TypeError, match="needs num_attention_heads="):
        NeuronAttentionBase(InferenceConfig(_fp32()), 64)
    from distattn import AttentionConfig

    with pytest.raises(TypeError, match=r"takes no \['qkv_bias'\]"):
        NeuronAttentionBase(AttentionConfig(hidden_size=64, num_attention_heads=4), qkv_bias=True)


def test_forward_mask_errors() -> None:
    attn = NeuronAttentionBase(InferenceConfig(_fp32()), 64, 4)
    x = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match=r"expected \[1, 1, 4, 4\] over the new tokens"):
        attn(x, attention_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="additive float masks"):
        attn(x, attention_mask=torch.zeros(1, 1, 4, 4))
    kv = (torch.zeros(1, 4, 8, 16), torch.zeros(1, 4, 8, 16))
    with pytest.raises(ValueError, match=r"expected \[1, 1, 1, 8\] over the 8 prior cache slots"):
        attn(x[:, :1], attention_mask=torch.ones(1, 1, 1, 6, dtype=torch.bool), position_ids=torch.tensor([[4]]), past_key_value=kv)
    with pytest.raises(ValueError, match="needs a layer built with rope_theta and no rotary_emb"):
        NeuronAttentionBase(InferenceConfig(_fp32()), 64, 4, rotary_emb=torch.nn.Identity())(x, use_polar_compatible_rope=True)
    with pytest.raises(ValueError, match="windowed context encoding is not supported"):
        attn(x, windowed_context_encoding_window_idx=0)


def test_neuron_only_keywords_are_listed_once(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="distattn.nxdi")
    neuron_config = NeuronConfig(torch_dtype=torch.float32, flash_decoding_enabled=True)
    for _ in range(3):
        NeuronAttentionBase(InferenceConfig(neuron_config), 64, 4, num_cores_per_group=4, optimize_interleave_attn=True,
                            rpl_reduce_dtype=torch.float32)
    lines = [r.getMessage() for r in caplog.records if "no effect here" in r.getMessage()]
    assert len(lines) == 1
    assert "num_cores_per_group=4" in lines[0] and "optimize_interleave_attn=True" in lines[0] and "rpl_reduce_dtype" in lines[0]
    assert "neuron_config.flash_decoding_enabled=True" in lines[0]


def test_unsupported_nxdi_imports_say_what_is_supported() -> None:
    with pytest.raises(ModuleNotFoundError, match="distattn.nxdi mirrors only the NxDI modules attention code imports"):
        import distattn.nxdi.models.model_base  # noqa: F401
    with pytest.raises(ImportError, match=r"provides only what NxDI attention code needs: InferenceConfig"):
        from distattn.nxdi.models.config import OnDeviceSamplingConfig  # noqa: F401
    from distattn.nxdi.modules.attention.attention_base import QKNormPlacement as Placement

    assert Placement is QKNormPlacement


def test_from_nxdi_takes_our_options_too() -> None:
    from distattn.parallel import ParallelGroups

    attn = NeuronAttentionBase.from_nxdi(
        hidden_size=64, num_attention_heads=4, softmax_scale=8.0, dtype=torch.float64, kernel="reference", layer_idx=3, groups=ParallelGroups()
    )
    assert attn.o_proj.weight.dtype == torch.float64 and attn.kernel == "reference" and attn.layer_idx == 3
    assert attn.attn_config.scale == pytest.approx(1 / 8)
    mgr = KVCacheManager.for_modules([attn] * 4, max_batch_size=1, max_seq_len=8)
    attn(torch.randn(1, 3, 64, dtype=torch.float64), position_ids=torch.arange(3)[None], kv_mgr=mgr)  # idx from layer_idx
    assert int(mgr.layer(3).positions.max()) == 2


def test_fused_qkv_clip_qkv_and_head_dim_in_the_nxdi_form() -> None:
    """neuron_config.fused_qkv, clip_qkv, an explicit head_dim and a sliding window: the fp64 reference layer's output."""
    torch.manual_seed(0)
    config = InferenceConfig(NeuronConfig(torch_dtype=torch.float64, fused_qkv=True))
    attn = NeuronAttentionBase(config, hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                               clip_qkv=0.5, sliding_window=4, qkv_bias=True)
    assert attn.attn_config.fused_qkv and hasattr(attn, "qkv_proj")
    weights = _random_weights(attn)
    x, pos = torch.randn(2, 9, 48, dtype=torch.float64), torch.arange(9).expand(2, -1)
    expected = reference_layer(attn.attn_config, weights, x, pos)
    assert (attn(x).hidden_states - expected).abs().max() <= FP64
    unclipped = reference_layer(dataclasses.replace(attn.attn_config, clip_qkv=None), weights, x, pos)
    assert (unclipped - expected).abs().max() > 1e-3  # the clip matters for these inputs


def test_cos_sin_a_layer_returns_serve_the_next_layer() -> None:
    """NxDI decoder stacks hand each layer's cos_cache / sin_cache to the next: the output is unchanged."""
    model = build_model("qwen3")
    _, (first, second) = build_port("qwen3", model, _fp32())
    x, pos = torch.randn(2, 7, 64), torch.arange(3, 10).expand(2, -1)
    _, _, cos, sin = first(x, position_ids=pos)
    assert cos.shape == (2, 7, 16)  # NxDI's RotaryEmbedding tables [B, S, head_dim]
    handed = second(x, position_ids=pos, cos_cache=cos, sin_cache=sin).hidden_states
    own = second(x, position_ids=pos).hidden_states
    assert torch.equal(handed, own)
