"""What a hostile client or a careless user sends beyond tests/test_bad_inputs.py: the Engine, the layer and the
model's forward, the paged cache, loaders, NxDI's form and the command line.

Each refusal row asserts the error type, a message naming the field, and that nothing changed (the checksum of
every parameter, buffer and cache of test_bad_inputs' world, and the Engine's queue). Each acceptance row checks the
result against a recompute. The HTTP server's rows are test_server.py's BAD table.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase
from distattn.models import DecoderLM, generate
from distattn.nxdi.models.config import InferenceConfig, NeuronConfig
from distattn.nxdi.modules.attention.attention_base import NeuronAttentionBase as NxdiBase
from distattn.nxdi.modules.attention.utils import RotaryEmbedding
from distattn.runtime.engine import Engine
from distattn.runtime.sampler import LogitRules

from test_bad_inputs import World, world  # noqa: F401  (the module-scoped fixture)
from hf_reference import HEAD_DIM as DIM, HEADS, HIDDEN, KV_HEADS as KV
from processes import processes_with

ENGINES: dict[int, Engine] = {}


def _engine(w: World) -> Engine:
    """One small Engine over the world's model (a pool of 6 blocks of 4 tokens)."""
    if id(w) not in ENGINES:
        ENGINES[id(w)] = Engine(w.model, max_seq_len=40, max_running=2, block_size=4, num_blocks=6)
    return ENGINES[id(w)]


def _add(w: World, **kw: object) -> object:
    return _engine(w).add([1, 2, 3], **{"max_new_tokens": 3, **kw})


def _copy_checkpoint(w: World, name: str, edit: dict[str, str]) -> Path:
    """The world's checkpoint with files written over (name -> text)."""
    path = w.root / name
    if not path.exists():
        shutil.copytree(w.root / "model", path)
        for file, text in edit.items():
            (path / file).write_text(text)
    return path


def _nxdi(**neuron: object) -> NxdiBase:
    return NxdiBase(InferenceConfig(NeuronConfig(**{"torch_dtype": torch.float32, **neuron})), hidden_size=64, num_attention_heads=4)


def _fresh_row(w: World) -> object:
    """A decode on cache row 1 of a fresh cache: nothing was ever written there."""
    cache = w.model.new_cache(2, 32)
    return w.model(torch.tensor([[5]]), position_ids=torch.tensor([[5]]), cache=cache, seq_ids=torch.tensor([1]))


x1 = torch.ones(1, 1, HIDDEN)
SHARDED_INDEX = {"model.safetensors.index.json": '{"metadata": {}, "weight_map": {"model.embed'}

REFUSED = [
    # ---- the Engine ---------------------------------------------------------------------------------
    ("engine: prompt beyond the pool", lambda w: _engine(w).add(list(range(1, 30)), max_new_tokens=5), ValueError,
     r"can never fit this engine's KV cache: it needs up to 9 blocks of 4 tokens .* which has 6"),
    ("engine: cancel an id", lambda w: _engine(w).cancel(7), TypeError, r"cancel takes the Request that add returned, not int 7"),
    ("engine: cancel None", lambda w: _engine(w).cancel(None), TypeError, r"cancel takes the Request"),
    ("engine: logprobs 21", lambda w: _add(w, logprobs=21), ValueError, r"logprobs=21 is invalid: pass an integer in \[0, 20\]"),
    ("engine: logprobs a float", lambda w: _add(w, logprobs=2.0), ValueError, r"logprobs=2.0 is invalid"),
    ("engine: prompt_logprobs -1", lambda w: _add(w, prompt_logprobs=-1), ValueError, r"prompt_logprobs=-1 is invalid"),
    ("engine: bias token beyond vocab", lambda w: _add(w, rules=LogitRules(bias=((500, 1.0),))), ValueError, r"logit_bias: token 500"),
    ("engine: bias token a string", lambda w: _add(w, rules=LogitRules(bias=(("5", 1.0),))), ValueError, r"logit_bias: token '5'"),
    ("engine: bias nan", lambda w: _add(w, rules=LogitRules(bias=((5, float("nan")),))), ValueError, r"logit_bias\[5\]=nan is invalid"),
    ("engine: bias 200", lambda w: _add(w, rules=LogitRules(bias=((5, 200.0),))), ValueError, r"logit_bias\[5\]=200.0 is invalid"),
    ("engine: presence 3", lambda w: _add(w, rules=LogitRules(presence_penalty=3.0)), ValueError, r"presence_penalty=3.0 is invalid"),
    ("engine: frequency inf", lambda w: _add(w, rules=LogitRules(frequency_penalty=float("inf"))), ValueError,
     r"frequency_penalty=inf is invalid"),
    ("engine: min_tokens above max", lambda w: _add(w, rules=LogitRules(min_tokens=4)), ValueError, r"min_tokens=4 is invalid"),
    ("engine: rules a dict", lambda w: _add(w, rules={"min_tokens": 1}), TypeError, r"rules must be a distattn.runtime.sampler.LogitRules"),
    ("engine: seed a string", lambda w: _add(w, seed="7"), TypeError, r"seed='7' must be an integer"),
    # ---- the model's forward and the layer ------------------------------------------------------------------
    ("forward: decode a row never prefilled", _fresh_row, ValueError,
     r"position_ids: cache row 1 holds nothing, so the call cannot continue it at position 5: feed its tokens from position 0"),
    ("forward: a gap after the prompt", lambda w: w.model(torch.tensor([[5], [6]]), position_ids=torch.tensor([[9], [3]]), cache=w.cache),
     ValueError, r"cache row 0 holds positions up to 2, so the call cannot continue it at position 9: feed its tokens from position 3"),
    ("layer: a gap in the NxDI form", lambda w: w.module(x1.expand(2, 1, HIDDEN), position_ids=torch.tensor([[6], [8]]),
                                                          kv_mgr=w.module_cache), ValueError, r"cache row 1 holds positions up to 5"),
    ("layer: cos_cache a list", lambda w: w.module(x1, position_ids=torch.tensor([[6]]), kv_mgr=w.module_cache, seq_ids=torch.tensor([0]),
                                                   cos_cache=[[[1.0] * DIM]], sin_cache=torch.zeros(1, 1, DIM)), TypeError,
     r"cos_cache is a list; pass a tensor"),
    ("layer: sin_cache a tuple", lambda w: w.module(x1, position_ids=torch.tensor([[6]]), kv_mgr=w.module_cache, seq_ids=torch.tensor([0]),
                                                    cos_cache=torch.ones(1, 1, DIM), sin_cache=((0.0,) * DIM,)), TypeError,
     r"sin_cache is a tuple; pass a tensor"),
    ("layer: attention_mask of 2s", lambda w: w.module(x1, position_ids=torch.tensor([[6]]), kv_mgr=w.module_cache,
                                                       seq_ids=torch.tensor([0]), attention_mask=torch.full((1, 1), 2.0)), ValueError,
     r"attention_mask holds \[2.0\]"),
    ("layer: attention_mask NaN", lambda w: w.module(x1, position_ids=torch.tensor([[6]]), kv_mgr=w.module_cache,
                                                     seq_ids=torch.tensor([0]), attention_mask=torch.full((1, 1), float("nan"))), ValueError,
     r"attention_mask holds \[nan\]"),
    ("layer: dtype int32", lambda w: NeuronAttentionBase(AttentionConfig(hidden_size=HIDDEN, num_attention_heads=HEADS,
                                                                         num_key_value_heads=KV, head_dim=DIM), dtype=torch.int32),
     TypeError, r"dtype=torch.int32 must be a floating-point torch.dtype"),
    ("layer: dtype a string", lambda w: NeuronAttentionBase(AttentionConfig(hidden_size=HIDDEN, num_attention_heads=HEADS,
                                                                            num_key_value_heads=KV, head_dim=DIM), dtype="float32"),
     TypeError, r"dtype='float32' must be a floating-point torch.dtype"),
    # ---- the paged cache ------------------------------------------------------------------------------------
    ("paged: reserve a negative position", lambda w: w.paged.reserve(torch.tensor([0]), torch.tensor([[-3]])), ValueError,
     r"position_ids: -3 is negative; positions count from 0"),
    ("paged: reserve float positions", lambda w: w.paged.reserve(torch.tensor([0]), torch.tensor([[5.0]])), ValueError,
     r"position_ids must be an integer tensor \[batch, seq\]"),
    ("paged: reserve a list", lambda w: w.paged.reserve([0], [[5]]), ValueError, r"position_ids must be an integer tensor"),
    # ---- loaders -------------------------------------------------------------------------------------------
    ("load: truncated index", lambda w: DecoderLM.from_pretrained(_copy_checkpoint(w, "truncated-index", SHARDED_INDEX)), ValueError,
     r"model.safetensors.index.json' is not a safetensors index \(JSONDecodeError"),
    ("load: index without weight_map", lambda w: DecoderLM.from_pretrained(_copy_checkpoint(
        w, "no-weight-map", {"model.safetensors.index.json": '{"metadata": {}}'})), ValueError, r"is not a safetensors index \(KeyError"),
    ("load: weight_map a list", lambda w: DecoderLM.from_pretrained(_copy_checkpoint(
        w, "list-weight-map", {"model.safetensors.index.json": '{"weight_map": ["a"]}'})), ValueError,
     r'"weight_map" must map tensor names to shard file names'),
    ("load: truncated config", lambda w: DecoderLM.from_pretrained(_copy_checkpoint(w, "truncated-config", {"config.json": '{"model_ty'})),
     ValueError, r"config.json cannot be read as an HF config"),
    ("load: dtype int8", lambda w: DecoderLM.from_pretrained(w.root / "model", dtype=torch.int8), TypeError,
     r"dtype=torch.int8 must be a floating-point torch.dtype"),
    # ---- NxDI's form ---------------------------------------------------------------------------------------
    ("nxdi: tp_degree 0", lambda w: _nxdi(tp_degree=0), ValueError, r"neuron_config.tp_degree=0 is invalid: pass a positive integer"),
    ("nxdi: cp_degree -1", lambda w: _nxdi(cp_degree=-1), ValueError, r"neuron_config.cp_degree=-1 is invalid"),
    ("nxdi: attention_dp_degree 1.5", lambda w: _nxdi(attention_dp_degree=1.5), ValueError, r"neuron_config.attention_dp_degree=1.5"),
    ("nxdi: tp_degree True", lambda w: _nxdi(tp_degree=True), ValueError, r"neuron_config.tp_degree=True is invalid"),
    ("nxdi: torch_dtype int32", lambda w: _nxdi(torch_dtype=torch.int32), ValueError, r"torch_dtype=torch.int32 is not supported"),
    ("nxdi: torch_dtype 'int8'", lambda w: _nxdi(torch_dtype="int8"), ValueError, r"torch_dtype='int8' is not supported"),
    ("nxdi: attention_dtype bool", lambda w: _nxdi(attention_dtype=torch.bool), ValueError, r"torch_dtype=torch.bool is not supported"),
    ("nxdi: rotary factor 0", lambda w: RotaryEmbedding(8, 128, 10000, 0), ValueError, r"factor=0 must be a positive number"),
    ("nxdi: rotary factor yarn", lambda w: RotaryEmbedding(8, factor={"rope_type": "yarn", "factor": 4.0}), ValueError,
     r"RotaryEmbedding scales linearly; for rope_type 'yarn'"),
    ("nxdi: rotary factor a string", lambda w: RotaryEmbedding(8, factor="4"), ValueError, r"factor='4' must be a positive number"),
]


@pytest.mark.parametrize("name,call,error,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_hostile_input_is_refused_before_any_change(world: World, name: str, call, error: type, message: str) -> None:  # noqa: F811
    before, queued = world.digest(), len(_engine(world).waiting)
    with pytest.raises(error, match=message):
        call(world)
    assert world.digest() == before and len(_engine(world).waiting) == queued, f"{name}: state changed although the call was refused"


def test_accepted_inputs_give_the_recomputed_result(world: World) -> None:  # noqa: F811
    """Inputs a strict server might refuse but HF / OpenAI / NxDI accept: each gives what a recompute gives."""
    model, prompts = world.model, [[5, 6, 7, 8], [9, 10, 11]]
    # float and int 0/1 padding masks, as HF users build them, equal the bool mask
    ids, pos = torch.tensor([[5, 6, 7], [9, 10, 0]]), torch.arange(3).expand(2, 3)
    masks = [torch.tensor([[True, True, True], [True, True, False]])]
    masks += [masks[0].float(), masks[0].long(), masks[0].to(torch.float16)]
    outs = [model(ids, position_ids=pos, cache=model.new_cache(2, 8), attention_mask=m) for m in masks]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    # any int is a seed (taken modulo 2**64): 2**64 draws as 0 does, -1 as 2**64 - 1
    sampled = [generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=s).tokens for s in (0, 2**64, -1, 2**64 - 1)]
    assert sampled[0] == sampled[1] and sampled[2] == sampled[3] and sampled[0] != sampled[2]
    # an Engine request with seed 2**64 runs, as seed 0
    engine = Engine(model, max_seq_len=20, max_running=2, block_size=4)
    reqs = [engine.add(prompts[0], max_new_tokens=5, temperature=1.0, seed=s) for s in (2**64, 0)]
    while engine.has_work():
        engine.step()
    assert reqs[0].out == reqs[1].out == sampled[0][0][:5]
    # NxDI's RotaryEmbedding(dim, max_position_embeddings, base, factor): linear scaling as HF's "linear" rope
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8, rope_theta=500.0,
                                          rope_scaling={"rope_type": "linear", "factor": 4.0}))
    positions = torch.arange(40).view(1, -1)
    expected = hf(torch.zeros(1), positions)
    for rotary in (RotaryEmbedding(8, 2048, 500.0, 4.0), RotaryEmbedding(8, base=500.0, factor={"rope_type": "linear", "factor": 4.0})):
        got = rotary(torch.zeros(1), positions)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))  # fp32 tables: rounding of cos / sin only
    # NxDI's base InferenceConfig.add_derived_config: num_cores_per_group = 1 (Llama 4's attention reads it)
    assert InferenceConfig(NeuronConfig()).num_cores_per_group == 1
    # a past_key_value whose invisible slots hold NaN: the output of clean slots
    module = NeuronAttentionBase(AttentionConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=DIM))
    x = torch.randn(1, 5, HIDDEN)
    with torch.no_grad():
        k, v = module(x[:, :4]).present_key_value
        clean = (torch.cat([k, torch.zeros(1, KV, 4, DIM)], 2), torch.cat([v, torch.zeros(1, KV, 4, DIM)], 2))
        dirty = (torch.cat([k, torch.full((1, KV, 4, DIM), float("nan"))], 2), torch.cat([v, torch.full((1, KV, 4, DIM), float("inf"))], 2))
        a = module(x[:, 4:], position_ids=torch.tensor([[4]]), past_key_value=clean).hidden_states
        b = module(x[:, 4:], position_ids=torch.tensor([[4]]), past_key_value=dirty).hidden_states
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())


# ---- the command line -------------------------------------------------------------------------------------

def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


CLI = [
    ("serve --port 70000", ["serve", "--port", "70000"], "--port 70000: pass a TCP port in 1-65535"),
    ("serve --port 0", ["serve", "--port", "0"], "--port 0: pass a TCP port in 1-65535"),
    ("serve --port in use", ["serve", "--port", "{busy}"], "cannot listen there"),
    ("serve --host unknown", ["serve", "--host", "999.1.1.1", "--port", "8123"], "--host 999.1.1.1 --port 8123: cannot listen there"),
    ("serve --max-model-len 1", ["serve", "--max-model-len", "1"], "--max-model-len 1: pass at least 2"),
    ("generate --tp 2, refused in the workers", ["generate", "--prompt-ids", "1", "--tp", "2", "--lora", "{bad_adapter}"],
     "says r=4 but its tensors have rank [2]"),
]


@pytest.mark.parametrize("name,args,message", CLI, ids=[c[0] for c in CLI])
def test_command_line_refusals_come_before_loading_as_one_clean_message(world: World, name: str, args: list[str], message: str) -> None:  # noqa: F811
    """Exit 2, one `distattn: error:` line naming the option, no traceback (not torchrun's either), and the serve
    options checked before any model is loaded (no 'loading' line)."""
    from test_bad_inputs import _adapter

    busy, port = _busy_port()
    bad = str(_adapter(world, "rank", config={"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    args = [a.replace("{busy}", str(port)).replace("{bad_adapter}", bad) for a in args]
    try:
        done = subprocess.run([sys.executable, "-m", "distattn.cli", *args[:1], "--model", str(world.root / "model"), *args[1:]],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        busy.close()
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("distattn: error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
    assert "distattn serve:" not in done.stdout  # nothing was served


def test_the_tables_are_large_enough() -> None:
    from test_server import BAD

    assert len(REFUSED) + len(CLI) + len(BAD) - 19 >= 60  # 19: the server rows that were there before
    assert json.dumps([c[0] for c in REFUSED])  # names are plain strings


def test_sigterm_to_generate_tp2_stops_every_process_it_started(world: World) -> None:  # noqa: F811
    """`distattn generate --tp 2` relaunches under torchrun; SIGTERM to the command the user started (what systemd,
    Docker and Kubernetes send) stops torchrun and both workers within 10 s."""
    import signal
    import time

    marker = "--max-new-tokens 77"  # names this test's processes in /proc
    proc = subprocess.Popen([sys.executable, "-m", "distattn.cli", "generate", "--model", str(world.root / "model"), "--prompt-ids",
                             "1,2,3", "--tp", "2", *marker.split()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(processes_with(marker)) < 4 and proc.poll() is None:  # the command, torchrun, 2 workers
            time.sleep(0.05)
        assert len(processes_with(marker)) >= 4, "the workers never started: " + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and processes_with(marker):
            time.sleep(0.1)
        assert not processes_with(marker), "processes of generate --tp 2 outlived SIGTERM by 10 s"
    finally:
        proc.kill()
        proc.wait(timeout=30)
