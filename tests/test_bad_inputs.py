"""Bad input at every public entry: a clear error, naming the argument, raised before any state changes.

Beyond tests/test_errors.py (the attention module's own table). Each row calls one entry
with one mistake and asserts the error type, that the message names the argument, and
that a checksum of every parameter, buffer, LoRA tensor and KV cache is unchanged.
The command line's rows run `python -m distattn.cli` as a subprocess: exit status 2,
`distattn: error: ...` on stderr, no traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase, RopeConfig
from distattn.lora import LoraAdapter
from distattn.models import DecoderLM, generate, serve
from distattn.paged import PagedKVCacheManager

from test_models import family_checkpoint

from hf_reference import HEAD_DIM as DIM, HEADS, HIDDEN, KV_HEADS as KV  # test_models' tiny llama (vocab 97)

VOCAB = 97


def _save_adapter(root: Path, *, rank: int = 2, config: object = None, tensors: dict | None = None) -> Path:
    """A PEFT-format LoRA adapter on layer 0's q_proj / v_proj (adapter_config.json + adapter_model.safetensors)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]} if config is None else config
    (root / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    gen = torch.Generator().manual_seed(3)
    if tensors is None:
        tensors = {}
        for proj, out in (("q_proj", HEADS * DIM), ("v_proj", KV * DIM)):
            prefix = f"base_model.model.model.layers.0.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    return root


@dataclasses.dataclass
class World:
    """Everything a bad call could touch."""

    root: Path
    model: DecoderLM
    cache: KVCacheManager
    paged: PagedKVCacheManager
    module: NeuronAttentionBase
    module_cache: KVCacheManager
    good_adapter: Path

    def digest(self) -> str:
        h = hashlib.sha256()
        tensors = [*self.model.state_dict().values(), *self.module.state_dict().values()]
        for m in [*self.model.modules(), *self.module.modules()]:
            tensors += [t for t in (getattr(m, "lora_a", None), getattr(m, "lora_b", None)) if isinstance(t, torch.Tensor)]
            h.update(repr(getattr(m, "adapter_names", "")).encode())
        for mgr in (self.cache, self.module_cache):
            tensors += [t for layer in mgr.layers for t in (layer.k, layer.v, layer.positions)]
        tensors += [t for layer in self.paged.layers for t in (layer.k, layer.v, layer.positions)]
        for t in tensors:
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        h.update(repr(sorted((k, v) for g in self.paged.groups.values() for k, v in g.tables.items())).encode())
        return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    family_checkpoint("llama", root / "model")
    model = DecoderLM.from_pretrained(root / "model")
    good = _save_adapter(root / "good-adapter")
    model.load_lora_adapters([good])
    cache = model.new_cache(2, 32)
    generate(model, [[1, 2, 3]], max_new_tokens=2)  # warm paths
    model(torch.tensor([[1, 2, 3], [4, 5, 6]]), position_ids=torch.arange(3).expand(2, 3), cache=cache)  # some content
    paged = model.new_paged_cache(num_blocks=8, block_size=4, max_batch_size=2, max_seq_len=32)
    paged.add_sequence(0)
    paged.reserve(torch.tensor([0]), torch.arange(5).view(1, -1))
    model(torch.tensor([[1, 2, 3, 4, 5]]), position_ids=torch.arange(5).view(1, -1), cache=paged, seq_ids=torch.tensor([0]))
    cfg = AttentionConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=DIM, sliding_window=4)
    module = NeuronAttentionBase(cfg, layer_idx=0)
    module_cache = KVCacheManager(cfg, num_layers=1, max_batch_size=2, max_seq_len=32)
    with torch.no_grad():
        module(torch.randn(2, 6, HIDDEN), position_ids=torch.arange(6).expand(2, 6), kv_mgr=module_cache)
    return World(root, model, cache, paged, module, module_cache, good)


def _ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def _checkpoint(w: World, name: str, *, config: dict | None = None, drop: tuple[str, ...] = (), change: dict | None = None,
                no_weights: bool = False) -> Path:
    """A copy of the model checkpoint with its config edited, tensors dropped / replaced, or no weights at all."""
    from safetensors.torch import load_file

    path = w.root / name
    if path.exists():
        return path
    path.mkdir()
    cfg = json.loads((w.root / "model" / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config if config is not None and "model_type" in config and len(config) == 1
                                                 else {**cfg, **(config or {})}))
    if not no_weights:
        tensors = {k: v for k, v in load_file(str(w.root / "model" / "model.safetensors")).items() if k not in drop}
        tensors.update(change or {})
        save_file(tensors, str(path / "model.safetensors"))
    return path


def _adapter(w: World, name: str, **kwargs: object) -> Path:
    path = w.root / name
    return path if path.exists() else _save_adapter(path, **kwargs)


def _layer0(w: World, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> dict:
    return {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(shape, dtype=dtype),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(HEADS * DIM, shape[0], dtype=dtype)}


def _state_dict(w: World, **change: torch.Tensor) -> dict:
    sd = {k: v.clone() for k, v in torch.load(w.root / "module_sd.pt").items()} if (w.root / "module_sd.pt").exists() else None
    if sd is None:
        sd = {"q_proj.weight": torch.randn(HEADS * DIM, HIDDEN), "k_proj.weight": torch.randn(KV * DIM, HIDDEN),
              "v_proj.weight": torch.randn(KV * DIM, HIDDEN), "o_proj.weight": torch.randn(HIDDEN, HEADS * DIM)}
        torch.save(sd, w.root / "module_sd.pt")
    sd.update(change)
    return {k: v for k, v in sd.items() if v is not None}


M = lambda w: w.model  # noqa: E731
G = lambda w, prompts, **kw: generate(w.model, prompts, **{"max_new_tokens": 3, **kw})  # noqa: E731
S = lambda w, prompts, **kw: serve(w.model, prompts, **{"max_new_tokens": 3, **kw})  # noqa: E731
F = lambda w, ids, pos, **kw: w.model(ids, position_ids=pos, **{"cache": w.cache, **kw})  # noqa: E731
A = lambda w, x, pos, **kw: w.module(x, position_ids=pos, **{"kv_mgr": w.module_cache, **kw})  # noqa: E731
x1 = torch.ones(2, 1, HIDDEN)
INF, NAN = float("inf"), float("nan")

CASES = [
    # ---- generate ------------------------------------------------------------------------------------
    ("generate: float token", lambda w: G(w, [[1, 2.7]]), TypeError, r"prompts\[0\]\[1\]=2.7 is not a token id"),
    ("generate: token = vocab", lambda w: G(w, [[1, VOCAB]]), ValueError, r"prompts\[0\]\[1\]=97 is outside the vocabulary"),
    ("generate: negative token", lambda w: G(w, [[-1]]), ValueError, r"prompts\[0\]\[0\]=-1 is outside the vocabulary"),
    ("generate: bool token", lambda w: G(w, [[True, 2]]), TypeError, r"prompts\[0\]\[0\]=True is not a token id"),
    ("generate: tensor prompts", lambda w: G(w, torch.tensor([[1, 2]])), TypeError, r"prompts must be a list .* tensor.tolist\(\)"),
    ("generate: text prompt", lambda w: G(w, ["hello"]), TypeError, r"prompts\[0\] must be a list of token ids"),
    ("generate: flat prompt", lambda w: G(w, [1, 2]), TypeError, r"prompts\[0\] must be a list of token ids"),
    ("generate: no prompts", lambda w: G(w, []), ValueError, r"prompts must be a non-empty list"),
    ("generate: empty prompt", lambda w: G(w, [[1], []]), ValueError, r"prompts\[1\] is empty"),
    ("generate: max_new_tokens 0", lambda w: G(w, [[1]], max_new_tokens=0), ValueError, r"max_new_tokens=0 is invalid"),
    ("generate: max_new_tokens float", lambda w: G(w, [[1]], max_new_tokens=2.5), ValueError, r"max_new_tokens=2.5 is invalid"),
    ("generate: max_new_tokens bool", lambda w: G(w, [[1]], max_new_tokens=True), ValueError, r"max_new_tokens=True is invalid"),
    ("generate: temperature nan", lambda w: G(w, [[1]], temperature=NAN), ValueError, r"temperature=nan is invalid"),
    ("generate: temperature inf", lambda w: G(w, [[1]], temperature=INF), ValueError, r"temperature=inf is invalid"),
    ("generate: temperature < 0", lambda w: G(w, [[1]], temperature=-1.0), ValueError, r"temperature=-1.0 is invalid"),
    ("generate: top_p 0", lambda w: G(w, [[1]], temperature=1.0, top_p=0.0), ValueError, r"top_p=0.0 is invalid"),
    ("generate: top_p > 1", lambda w: G(w, [[1]], temperature=1.0, top_p=1.5), ValueError, r"top_p=1.5 is invalid"),
    ("generate: top_p nan", lambda w: G(w, [[1]], temperature=1.0, top_p=NAN), ValueError, r"top_p=nan is invalid"),
    ("generate: seed str", lambda w: G(w, [[1]], temperature=1.0, seed="x"), TypeError, r"seed='x' must be an integer"),
    ("generate: seed float", lambda w: G(w, [[1]], temperature=1.0, seed=1.5), TypeError, r"seed=1.5 must be an integer"),
    ("generate: stop_tokens int", lambda w: G(w, [[1]], stop_tokens=5), TypeError, r"stop_tokens must be a list"),
    ("generate: stop token beyond vocab", lambda w: G(w, [[1]], stop_tokens=[500]), ValueError, r"stop_tokens\[0\]=500 is outside"),
    ("generate: draft unknown", lambda w: G(w, [[1]], draft="ngram"), ValueError, r"draft='ngram'"),
    ("generate: draft with sampling", lambda w: G(w, [[1]], draft="prompt_lookup", temperature=0.5), ValueError, r"use temperature=0"),
    ("generate: draft_len 0", lambda w: G(w, [[1]], draft="prompt_lookup", draft_len=0), ValueError, r"draft_len=0 is invalid"),
    ("generate: ngram 0", lambda w: G(w, [[1]], draft="prompt_lookup", ngram=0), ValueError, r"ngram=0 is invalid"),
    ("generate: draft model missing", lambda w: G(w, [[1]], draft="model"), ValueError, r"draft='model' needs draft_model"),
    ("generate: adapter_ids count", lambda w: G(w, [[1], [2]], adapter_ids=[0]), ValueError, r"adapter_ids has 1 entries for 2 prompts"),
    ("generate: adapter id beyond", lambda w: G(w, [[1]], adapter_ids=[1]), ValueError, r"adapter_ids\[0\]=1 must be -1"),
    ("generate: adapter id -2", lambda w: G(w, [[1]], adapter_ids=[-2]), ValueError, r"adapter_ids\[0\]=-2 must be -1"),
    ("generate: adapter id float", lambda w: G(w, [[1]], adapter_ids=[0.0]), ValueError, r"adapter_ids\[0\]=0.0 must be -1"),
    # ---- serve -----------------------------------------------------------------------------------------
    ("serve: token beyond vocab", lambda w: S(w, [[1, 200]]), ValueError, r"prompts\[0\]\[1\]=200 is outside the vocabulary"),
    ("serve: block_size 0", lambda w: S(w, [[1]], block_size=0), ValueError, r"block_size=0 is invalid"),
    ("serve: num_blocks 0", lambda w: S(w, [[1]], num_blocks=0), ValueError, r"num_blocks=0 is invalid"),
    ("serve: max_running 0", lambda w: S(w, [[1]], max_running=0), ValueError, r"max_running=0 is invalid"),
    ("serve: prefill_chunk float", lambda w: S(w, [[1]], prefill_chunk=1.5), ValueError, r"prefill_chunk=1.5 is invalid"),
    ("serve: prefix_caching int", lambda w: S(w, [[1]], prefix_caching=1), TypeError, r"prefix_caching=1 must be True or False"),
    ("serve: draft model", lambda w: S(w, [[1]], draft="model"), ValueError, r"serve drafts with draft='prompt_lookup'"),
    ("serve: temperature nan", lambda w: S(w, [[1]], temperature=NAN), ValueError, r"temperature=nan is invalid"),
    # ---- DecoderLM.forward -------------------------------------------------------------------------------
    ("forward: token beyond vocab", lambda w: F(w, _ids([1, 200]), _ids([0, 1])), ValueError, r"input_ids holds \[200\] outside"),
    ("forward: negative token", lambda w: F(w, _ids([-3]), _ids([0])), ValueError, r"input_ids holds \[-3\] outside"),
    ("forward: list ids", lambda w: F(w, [[1, 2]], _ids([0, 1])), TypeError, r"input_ids must be a tensor"),
    ("forward: float ids", lambda w: F(w, torch.tensor([[1.0]]), _ids([0])), ValueError, r"input_ids must be an integer tensor"),
    ("forward: 1-D ids", lambda w: F(w, torch.tensor([1, 2]), _ids([0, 1])), ValueError, r"input_ids must be an integer tensor \[batch, seq\]"),
    ("forward: dict cache", lambda w: F(w, _ids([1]), _ids([0]), cache={}), TypeError, r"cache must be a KVCacheManager"),
    ("forward: position beyond cache", lambda w: F(w, _ids([1]), _ids([40])), ValueError, r"position_ids: position 40 is beyond"),
    ("forward: float positions", lambda w: F(w, _ids([1]), torch.tensor([[3.0]])), ValueError, r"position_ids dtype torch.float32"),
    ("forward: logits_at", lambda w: F(w, _ids([1, 2]), _ids([3, 4]), attention_mask=torch.tensor([[1.0, 0.5]])), ValueError,
     r"attention_mask holds \[0.5\]: a padding mask is bool, or integers / floats that are only 0"),
    ("forward: seq_ids beyond", lambda w: F(w, _ids([1]), _ids([3]), seq_ids=torch.tensor([5])), ValueError, r"seq_ids: \[5\] has an id outside"),
    ("forward: adapter id beyond", lambda w: F(w, _ids([1]), _ids([3]), adapter_ids=torch.tensor([3])), ValueError, r"adapter_ids"),
    # ---- the attention module ----------------------------------------------------------------------------
    ("module: float active_mask", lambda w: A(w, torch.ones(2, 2, HIDDEN), _ids([6, 7], [6, 7]), active_mask=torch.zeros(2, 1, 2, 2)),
     ValueError, r"active_mask must be bool or hold only 0 and 1 .*\(mask == 0\)"),
    ("module: active_mask of 2s", lambda w: A(w, torch.ones(2, 2, HIDDEN), _ids([6, 7], [6, 7]), active_mask=torch.full((2, 1, 2, 2), 2)),
     ValueError, r"active_mask must be bool or hold only 0 and 1"),
    ("module: float rotary positions", lambda w: A(w, x1, _ids([6], [6]), rotary_position_ids=torch.tensor([[6.5], [6.0]])), ValueError,
     r"rotary_position_ids dtype torch.float32 must be an integer"),
    ("module: list rotary positions", lambda w: A(w, x1, _ids([6], [6]), rotary_position_ids=[[6], [6]]), TypeError,
     r"rotary_position_ids must be a tensor"),
    ("module: negative rotary positions", lambda w: A(w, x1, _ids([6], [6]), rotary_position_ids=_ids([-1], [6])), ValueError,
     r"rotary_position_ids has negative values"),
    ("module: dict kv_mgr", lambda w: A(w, x1, _ids([6], [6]), kv_mgr={}), TypeError, r"kv_mgr must be a distattn KVCacheManager"),
    ("module: list kv_mgr", lambda w: A(w, x1, _ids([6], [6]), kv_mgr=[]), TypeError, r"kv_mgr must be a distattn KVCacheManager"),
    ("module: rolling rewind", lambda w: A(w, x1, _ids([2], [2])), ValueError,
     r"position_ids: row 0 continues at position 2 .* speculation_width >= 4"),
    # ---- caches ------------------------------------------------------------------------------------------
    ("cache reset -1", lambda w: w.cache.reset(torch.tensor([-1])), ValueError, r"seq_ids \[-1\] has an id outside \[0, 2\)"),
    ("cache reset beyond", lambda w: w.cache.reset([2]), ValueError, r"seq_ids \[2\] has an id outside"),
    ("cache reset float", lambda w: w.cache.reset(torch.tensor([0.0])), ValueError, r"seq_ids dtype torch.float32"),
    ("cache reset str", lambda w: w.cache.reset("0"), TypeError, r"seq_ids='0' must be a tensor or a list of ints"),
    ("paged reset -1", lambda w: w.paged.reset(torch.tensor([-1])), ValueError, r"seq_ids \[-1\] has an id outside"),
    ("paged free beyond", lambda w: w.paged.free(3), ValueError, r"seq_id=3 must be an int in \[0, 2\)"),
    ("paged free float", lambda w: w.paged.free(0.0), ValueError, r"seq_id=0.0 must be an int"),
    ("new_cache 0 rows", lambda w: w.model.new_cache(0, 8), ValueError, r"max_batch_size=0 is invalid"),
    ("new_paged_cache block 0", lambda w: w.model.new_paged_cache(num_blocks=4, block_size=0, max_batch_size=1, max_seq_len=8), ValueError,
     r"block_size=0 is invalid"),
    # ---- configs -----------------------------------------------------------------------------------------
    ("config: softmax_scale inf", lambda w: AttentionConfig(hidden_size=32, num_attention_heads=4, softmax_scale=INF), ValueError,
     r"softmax_scale=inf is invalid"),
    ("config: softmax_scale 0", lambda w: AttentionConfig(hidden_size=32, num_attention_heads=4, softmax_scale=0.0), ValueError,
     r"softmax_scale=0.0 is invalid"),
    ("config: rms_norm_eps nan", lambda w: AttentionConfig(hidden_size=32, num_attention_heads=4, rms_norm_eps=NAN), ValueError,
     r"rms_norm_eps=nan is invalid"),
    ("config: qkv_bias 1", lambda w: AttentionConfig(hidden_size=32, num_attention_heads=4, qkv_bias=1), ValueError, r"qkv_bias=1 is invalid"),
    ("config: hidden_size bool", lambda w: AttentionConfig(hidden_size=True, num_attention_heads=1), ValueError, r"hidden_size=True is invalid"),
    ("rope: yarn attention_factor nan", lambda w: RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                             attention_factor=NAN), ValueError, r"rope.attention_factor=nan is invalid"),
    ("rope: yarn attention_factor 0", lambda w: RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                           attention_factor=0.0), ValueError, r"rope.attention_factor=0.0 is invalid"),
    ("rope: negative original length", lambda w: RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=-5), ValueError,
     r"rope.original_max_position_embeddings=-5 is invalid"),
    ("rope: llama3 low_freq_factor 0", lambda w: RopeConfig(rope_type="llama3", factor=8.0, low_freq_factor=0.0,
                                                            original_max_position_embeddings=64), ValueError, r"rope.low_freq_factor=0.0 is invalid"),
    ("rope: llama3 low > high", lambda w: RopeConfig(rope_type="llama3", factor=8.0, low_freq_factor=5.0,
                                                     original_max_position_embeddings=64), ValueError, r"rope.low_freq_factor=5.0 is invalid"),
    ("rope: yarn beta_slow > beta_fast", lambda w: RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                              beta_fast=1.0, beta_slow=32.0), ValueError, r"rope.beta_slow=32.0 is invalid"),
    ("rope: factor inf", lambda w: RopeConfig(rope_type="linear", factor=INF), ValueError, r"rope.factor=inf is invalid"),
    ("rope: theta inf", lambda w: RopeConfig(theta=INF), ValueError, r"rope.theta=inf is invalid"),
    # ---- loading -----------------------------------------------------------------------------------------
    ("from_pretrained: dtype str", lambda w: DecoderLM.from_pretrained(w.root / "model", dtype="float32"), TypeError,
     r"dtype='float32' must be a floating-point torch.dtype"),
    ("from_pretrained: dtype int", lambda w: DecoderLM.from_pretrained(w.root / "model", dtype=torch.int8), TypeError, r"dtype=torch.int8"),
    ("from_pretrained: pack str", lambda w: DecoderLM.from_pretrained(w.root / "model", pack="yes"), TypeError, r"pack='yes' must be True"),
    ("from_pretrained: more layers", lambda w: DecoderLM.from_pretrained(_checkpoint(w, "layers4", config={"num_hidden_layers": 4})),
     ValueError, r"does not match its config.json \(4 layers.*the files hold 2 layers\): missing \['model.layers.2"),
    ("from_pretrained: other vocab", lambda w: DecoderLM.from_pretrained(_checkpoint(w, "vocab50", config={"vocab_size": 50})),
     ValueError, r"mis-shaped \['lm_head.weight: \[97, 64\], config needs \[50, 64\]"),
    ("from_pretrained: bare config", lambda w: DecoderLM.from_pretrained(_checkpoint(w, "bare", config={"model_type": "llama"},
                                                                                       no_weights=True)),
     ValueError, r"has no \*.safetensors file"),
    ("from_pretrained: unknown family", lambda w: DecoderLM.from_pretrained(_checkpoint(w, "gpt2", config={"model_type": "gpt2"},
                                                                                         no_weights=True)),
     ValueError, r"model_type='gpt2' is not supported"),
    ("from_pretrained: MLP of another size", lambda w: DecoderLM.from_pretrained(_checkpoint(
        w, "mlp", change={"model.layers.1.mlp.up_proj.weight": torch.zeros(120, HIDDEN)})), ValueError,
     r"model.layers.1.mlp.up_proj.weight: \[120, 64\], config needs \[96, 64\]"),
    ("from_pretrained: int8 weights", lambda w: DecoderLM.from_pretrained(_checkpoint(
        w, "int8", change={"model.layers.0.mlp.down_proj.weight": torch.zeros(HIDDEN, 96, dtype=torch.int8)})), ValueError,
     r"not floating point: \['model.layers.0.mlp.down_proj.weight: I8'\]"),
    ("from_pretrained: missing lm_head", lambda w: DecoderLM.from_pretrained(_checkpoint(w, "nohead", drop=("lm_head.weight",))),
     ValueError, r"missing \['lm_head.weight'\]"),
    ("load_hf_state_dict: missing o_proj", lambda w: w.module.load_hf_state_dict(_state_dict(w, **{"o_proj.weight": None})), ValueError,
     r"missing \['o_proj.weight'\]"),
    ("load_hf_state_dict: int8 tensor", lambda w: w.module.load_hf_state_dict(_state_dict(w, **{
        "o_proj.weight": torch.zeros(HIDDEN, HEADS * DIM, dtype=torch.int8)})), ValueError, r"not floating point: \['o_proj.weight: int8'\]"),
    ("load_hf_state_dict: list tensor", lambda w: w.module.load_hf_state_dict(_state_dict(w, **{"o_proj.weight": [[0.0]]})), TypeError,
     r"state_dict entries \['o_proj.weight'\] are not tensors"),
    ("load_hf_state_dict: meta tensor", lambda w: w.module.load_hf_state_dict(_state_dict(w, **{
        "o_proj.weight": torch.empty(HIDDEN, HEADS * DIM, device="meta")})), TypeError, r"meta tensor"),
    ("lora: missing directory", lambda w: w.model.load_lora_adapters([w.root / "nowhere"]), ValueError, r"has no adapter_config.json"),
    ("lora: a path, not a list", lambda w: w.model.load_lora_adapters(str(w.good_adapter)), TypeError, r"adapters must be a list"),
    ("lora: config not JSON", lambda w: w.model.load_lora_adapters([w.good_adapter, _adapter(w, "notjson", config="{r: 2")]), ValueError,
     r"adapter_config.json is not valid JSON"),
    ("lora: lora_alpha null", lambda w: w.model.load_lora_adapters([w.good_adapter, _adapter(
        w, "alphanull", config={"peft_type": "LORA", "r": 2, "lora_alpha": None})]), ValueError, r"lora_alpha=None must be a finite number"),
    ("lora: rank contradicts r", lambda w: w.model.load_lora_adapters([w.good_adapter, _adapter(
        w, "rank", config={"peft_type": "LORA", "r": 4, "lora_alpha": 8})]), ValueError, r"says r=4 but its tensors have rank \[2\]"),
    ("lora: int8 tensors", lambda w: w.model.load_lora_adapters([w.good_adapter, _adapter(
        w, "int8lora", tensors=_layer0(w, (2, HIDDEN), torch.int8))]), ValueError, r"not floating point"),
    ("lora: second adapter does not fit", lambda w: w.model.load_lora_adapters([w.good_adapter, _adapter(
        w, "wide", tensors=_layer0(w, (2, HIDDEN + 1)))]), ValueError, r"LoRA adapter 'wide' does not fit this layer"),
    ("lora: duplicate names", lambda w: w.model.load_lora_adapters([w.good_adapter, w.good_adapter]), ValueError, r"adapters share names"),
    ("lora: DoRA", lambda w: w.model.load_lora_adapters([_adapter(w, "dora", config={"peft_type": "LORA", "r": 2, "use_dora": True})]),
     ValueError, r"use_dora=True: DoRA is not supported"),
    ("compile_decode: str", lambda w: w.model.compile_decode("yes"), TypeError, r"enable='yes' must be True or False"),
]


@pytest.mark.parametrize("name,call,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_change(world: World, name: str, call, error: type, message: str) -> None:
    before = world.digest()
    with pytest.raises(error, match=message):
        call(world)
    assert world.digest() == before, f"{name}: state changed although the call was refused"


def test_the_table_is_large_enough() -> None:
    assert len(CASES) + len(CLI_CASES) >= 80


# ---- the command line, as a subprocess ------------------------------------------------------------------------

CLI_CASES = [
    ("bad --prompt-ids", ["--prompt-ids", "1,x"], "--prompt-ids takes comma-separated integers"),
    ("token beyond vocab", ["--prompt-ids", "1,500"], "prompt token ids [500] are outside the model's vocabulary [0, 97)"),
    ("--temperature -1", ["--prompt-ids", "1", "--temperature", "-1"], "--temperature -1.0: pass a number >= 0"),
    ("--top-p 0", ["--prompt-ids", "1", "--top-p", "0"], "--top-p 0.0: pass a number in (0, 1]"),
    ("missing --lora", ["--prompt-ids", "1", "--lora", "/nonexistent-adapter"], "--lora /nonexistent-adapter: no adapter_config.json"),
    ("--tp not dividing the MLP", ["--prompt-ids", "1", "--tp", "5"], "--tp 5 does not divide the model's intermediate_size 96"),
    ("--dp split before launching", ["--prompt-ids", "1", "2", "3", "--tp", "2", "--dp", "2"], "--dp 2 splits the batch"),
    ("--device tpu", ["--prompt-ids", "1", "--device", "tpu"], "--device tpu: use cpu or cuda"),
    ("--stop beyond vocab", ["--prompt-ids", "1", "--stop", "1000"], "--stop 1000 is outside the model's vocabulary"),
    ("--prompt and --prompt-ids", ["--prompt-ids", "1", "--prompt", "hi"], "pass --prompt or --prompt-ids, not both"),
    ("draft with sampling", ["--prompt-ids", "1", "--draft", "prompt_lookup", "--temperature", "0.7"], "verified greedily"),
    ("--model without config", ["--model", "/nonexistent-model", "--prompt-ids", "1"], "no config.json there"),
    ("library refusal", ["--prompt-ids", "1", "--lora", "{bad_adapter}"], "says r=4 but its tensors have rank [2]"),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("--device cuda without CUDA", ["--prompt-ids", "1", "--device", "cuda"], "this machine has no CUDA device"))
LAUNCHER_CASES = [
    ("torchrun without --tp", {"WORLD_SIZE": "2", "RANK": "0"}, ["--prompt-ids", "1"], "running under a launcher with 2 processes: pass --tp 2"),
    ("torchrun --tp 3 on 2 processes", {"WORLD_SIZE": "2", "RANK": "0"}, ["--prompt-ids", "1", "--tp", "3"],
     "--tp 3 but the launcher started 2 processes"),
    ("torchrun --tp 4 on 2 processes", {"WORLD_SIZE": "2", "RANK": "1"}, ["--prompt-ids", "1", "--tp", "4"],
     "--tp 4 but the launcher started 2 processes"),
]
CLI_CASES_ALL = [(n, {}, a, m) for n, a, m in CLI_CASES] + LAUNCHER_CASES


@pytest.mark.parametrize("name,env,args,message", CLI_CASES_ALL, ids=[c[0] for c in CLI_CASES_ALL])
def test_command_line_mistakes_exit_2_with_a_message(world: World, name: str, env: dict, args: list[str], message: str) -> None:
    bad_adapter = str(_adapter(world, "rank", config={"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    args = [a.replace("{bad_adapter}", bad_adapter) for a in args]
    model = [] if "--model" in args else ["--model", str(world.root / "model")]
    done = subprocess.run([sys.executable, "-m", "distattn.cli", "generate", *model, *args, "--max-new-tokens", "2"],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("distattn: error: ") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_version_and_help_show_what_a_user_needs() -> None:
    done = subprocess.run([sys.executable, "-m", "distattn.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().startswith("distattn 0.")
    done = subprocess.run([sys.executable, "-m", "distattn.cli", "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "(default: 32)" in done.stdout and "--stop" in done.stdout


def test_a_load_failing_half_way_leaves_the_module_as_it_was(world: World) -> None:
    """A read that fails after some projections were written (a file going away under the loader, a corrupt
    region) restores every parameter: the load is all-or-nothing."""
    from distattn.hf import StateDictSource

    class FailsLate(StateDictSource):
        def read(self, name: str, *args: object) -> torch.Tensor:
            if name == "o_proj.weight":
                raise OSError("the disk went away")
            return super().read(name, *args)

    before = world.digest()
    with pytest.raises(OSError, match="the disk went away"):
        world.module.load_hf(FailsLate(_state_dict(world)))
    assert world.digest() == before
    world.module.load_hf(StateDictSource(_state_dict(world)))  # the same load, whole: it does write
    assert world.digest() != before
