"""The `distattn` command line: generate, demo, bench.

    distattn demo [--family gpt-oss|llama4|gemma3|llama]   the built-in default: a tiny model, 2 processes, checked against HF
    distattn generate --model DIR --prompt-ids 1,2,3 [--tp 2 --cp 2 --dp 2] [--json]
    distattn generate ... --paged [--max-running 8 --prefill-chunk 64 --block-size 16]   paged cache, continuous batching
    distattn generate ... --lora DIR [DIR ...] --adapter-ids 0 -1                      PEFT LoRA adapters, one per prompt
    distattn generate ... --draft model --draft-model SMALL_DIR                        speculative decoding with a draft model
    distattn bench [--quick]               the kernel benchmark against HF transformers
    distattn bench --model [--quick]       whole-model generate against HF generate

Multi-process runs go through PyTorch's own launcher (torch.distributed.run, i.e.
torchrun): `generate --tp N` re-launches itself with N processes on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def _fail(message: str) -> None:
    print(f"distattn: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _tokenizer(model: str):  # noqa: ANN202 (a transformers tokenizer)
    """The checkpoint's tokenizer, or None when it has none."""
    if not (Path(model) / "tokenizer_config.json").exists() and not (Path(model) / "tokenizer.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, local_files_only=True)


def _prompts(args: argparse.Namespace) -> tuple[list[list[int]], Any]:
    """(prompt token ids, the tokenizer that made them: None for --prompt-ids)."""
    if args.prompt_ids:
        try:
            return [[int(t) for t in group.split(",") if t.strip()] for group in args.prompt_ids], None
        except ValueError:
            _fail(f"--prompt-ids takes comma-separated integers, e.g. --prompt-ids 1,2,3 (got {args.prompt_ids})")
    tokenizer = _tokenizer(args.model)
    if tokenizer is None:
        _fail(f"--prompt needs a tokenizer in {args.model}; this checkpoint has none: pass --prompt-ids instead")
    return [tokenizer(p)["input_ids"] for p in args.prompt], tokenizer


def _relaunch(tp: int) -> int:
    """This command again under torchrun with `tp` processes on this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), "-m", "distattn.cli", *sys.argv[1:]]
    return subprocess.call(command)


def _read_config(model: str, option: str = "--model") -> dict:
    path = Path(model) / "config.json"
    if not path.exists():
        _fail(f"{option} {model}: no config.json there; pass a checkpoint directory saved with save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        _fail(f"{option} {model}: config.json is not valid JSON ({err})")
    if not isinstance(config, dict):
        _fail(f"{option} {model}: config.json must hold a JSON object")
    return config


def _generation_defaults(model: str) -> dict:
    """generation_config.json's sampling defaults, as HF generate applies them (greedy unless do_sample)."""
    path = Path(model) / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        _fail(f"--model {model}: generation_config.json is not valid JSON ({err})")
    if not config.get("do_sample"):
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": float(config.get("temperature", 1.0)), "top_p": float(config.get("top_p", 1.0))}


def _check_generate_args(args: argparse.Namespace) -> tuple[list[list[int]], Any]:
    """Every check that needs no model: options, files, and what the prompts must fit (exit 2 before any process
    starts); returns `_prompts(args)`."""
    config = _read_config(args.model)
    if not args.prompt and not args.prompt_ids:
        _fail("pass --prompt TEXT (checkpoints with a tokenizer) or --prompt-ids 1,2,3")
    if args.prompt and args.prompt_ids:
        _fail("pass --prompt or --prompt-ids, not both")
    for name in ("tp", "cp", "dp"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            _fail(f"--{name} must be >= 1")
    tp, cp, dp = args.tp or 1, args.cp or 1, args.dp or 1
    if tp % cp or tp % dp:
        _fail(f"--cp ({cp}) and --dp ({dp}) must divide --tp ({tp}): they split the tp ranks")
    if args.max_new_tokens < 1:
        _fail("--max-new-tokens must be >= 1")
    if args.temperature is not None and not 0 <= args.temperature < float("inf"):
        _fail(f"--temperature {args.temperature}: pass a number >= 0 (0: greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        _fail(f"--top-p {args.top_p}: pass a number in (0, 1]")
    if args.adapter_ids is not None and not args.lora:
        _fail("--adapter-ids picks among --lora adapters: pass --lora DIR [DIR ...] too")
    if args.lora and args.adapter_ids is not None and any(not -1 <= a < len(args.lora) for a in args.adapter_ids):
        _fail(f"--adapter-ids {args.adapter_ids}: each must be -1 (no adapter) or below the {len(args.lora)} --lora adapters")
    for adapter in args.lora or []:
        if not (Path(adapter) / "adapter_config.json").exists():
            _fail(f"--lora {adapter}: no adapter_config.json there; pass a directory saved by PEFT's save_pretrained")
    if (args.draft == "model") != (args.draft_model is not None):
        _fail("--draft model and --draft-model DIR go together")
    if args.draft_model is not None:
        _read_config(args.draft_model, "--draft-model")
    if args.draft != "none" and (args.temperature or 0.0) != 0.0:
        _fail("speculative drafts (--draft) are verified greedily: drop --temperature or pass --temperature 0")
    if args.draft == "model" and args.paged:
        _fail("--paged drafts with --draft prompt_lookup; --draft model runs without --paged")
    if args.paged and dp > 1:
        _fail("--paged does not support data-parallel decode: drop --dp or --paged")
    if args.compile and tp > 1:
        _fail(f"--compile runs at --tp 1 (got --tp {tp}): drop one of them")
    for name in ("max_running", "prefill_chunk", "block_size"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1")
    intermediate = config.get("intermediate_size")
    if isinstance(intermediate, int) and intermediate % tp:
        _fail(f"--tp {tp} does not divide the model's intermediate_size {intermediate} (the MLP is split across the tp ranks): "
              f"pick a divisor of it")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail(f"--device {args.device}: this machine has no CUDA device (or this torch build has no CUDA): use --device cpu")
    elif args.device != "cpu":
        _fail(f"--device {args.device}: use cpu or cuda")
    prompts, tokenizer = _prompts(args)
    if any(not p for p in prompts):
        _fail("every prompt needs at least one token")
    vocab = config.get("vocab_size")
    if isinstance(vocab, int):
        bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab})
        if bad:
            _fail(f"prompt token ids {bad[:8]} are outside the model's vocabulary [0, {vocab})")
    for token in args.stop or []:
        if isinstance(vocab, int) and not 0 <= token < vocab:
            _fail(f"--stop {token} is outside the model's vocabulary [0, {vocab})")
    if dp > 1 and len(prompts) % dp:
        _fail(f"--dp {dp} splits the batch: pass a multiple of {dp} prompts (got {len(prompts)})")
    if args.lora and args.adapter_ids is not None and len(args.adapter_ids) != len(prompts):
        _fail(f"--adapter-ids has {len(args.adapter_ids)} entries for {len(prompts)} prompts; pass one per prompt")
    return prompts, tokenizer


def _check_launch(args: argparse.Namespace) -> None:
    """Under torchrun (or any launcher setting WORLD_SIZE), --tp must name the world size: several processes
    without it would each run the whole model and print everything twice."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.tp is None:
        _fail(f"running under a launcher with {world} processes: pass --tp {world} (and --cp / --dp as wanted), "
              "or run `distattn generate --tp N` without torchrun: it launches its own processes")
    if "RANK" in os.environ and args.tp is not None and args.tp != world:
        _fail(f"--tp {args.tp} but the launcher started {world} processes: pass --tp {world} or launch {args.tp} processes")


def cmd_generate(args: argparse.Namespace) -> int:
    prompts, tokenizer = _check_generate_args(args)
    _check_launch(args)
    tp = args.tp or 1
    if tp > 1 and "RANK" not in os.environ:  # re-launch through torchrun, one process per rank
        return _relaunch(tp)
    import torch
    import torch.distributed as dist

    from .models import DecoderLM, generate, serve
    from .models.generate import _stop_set
    from .parallel import ParallelGroups

    device = torch.device(args.device)
    groups = ParallelGroups()
    if tp > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=300))
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        groups = ParallelGroups.from_world(cp_degree=args.cp or 1, dp_degree=args.dp or 1)
    adapter_ids = None
    if args.lora:
        adapter_ids = args.adapter_ids if args.adapter_ids is not None else [0] * len(prompts)
    dtype = getattr(torch, DTYPES[args.dtype])
    model = DecoderLM.from_pretrained(args.model, groups=groups, dtype=dtype, pack=False if args.compile else None,
                                      quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype).to(device)
    if args.lora:
        model.load_lora_adapters(args.lora)
    if args.compile:
        model.compile_decode()
    rank = dist.get_rank() if dist.is_initialized() else 0
    progress = None
    if rank == 0 and not args.json:
        from tqdm import tqdm

        progress = tqdm(total=len(prompts) * args.max_new_tokens, desc="generating", unit="tok", file=sys.stderr)
    sampling = _generation_defaults(args.model)  # the checkpoint's, where the user gave none (as HF generate)
    temperature = sampling["temperature"] if args.temperature is None else args.temperature
    top_p = sampling["top_p"] if args.top_p is None else args.top_p
    if args.draft != "none":
        temperature = 0.0  # speculation verifies greedily (an explicit --temperature > 0 was refused above)
    stop_tokens = sorted(_stop_set(model, None) | set(args.stop or []))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=top_p, seed=args.seed, stop_tokens=stop_tokens,
                   draft=args.draft, adapter_ids=adapter_ids, on_tokens=progress.update if progress is not None else None)
    draft_model = None if args.draft_model is None else DecoderLM.from_pretrained(args.draft_model, groups=groups, dtype=dtype).to(device)
    # warm-up, timed apart: first calls pay for thread pools, allocations and kernel choices
    tic = time.perf_counter()
    rows = groups.dp_size  # the fewest prompts a call can split over the data-parallel replicas
    generate(model, prompts[:rows], max_new_tokens=2, adapter_ids=None if adapter_ids is None else adapter_ids[:rows])
    if args.compile:  # this batch's graph, then (another cache length) the one generic in the cache length
        for new in (2, 3):
            generate(model, prompts, max_new_tokens=new, adapter_ids=adapter_ids)
    warmup_seconds = time.perf_counter() - tic
    if args.paged:
        result = serve(model, prompts, max_running=args.max_running, prefill_chunk=args.prefill_chunk, block_size=args.block_size, **options)
    else:
        result = generate(model, prompts, draft_model=draft_model, **options)
    if progress is not None:
        progress.close()
    if rank == 0:
        new = sum(len(t) for t in result.tokens)
        report = {
            "tokens": result.tokens,
            "model": model.describe(),
            "warmup_seconds": warmup_seconds,
            "time_to_first_token_s": result.prefill_seconds,  # the whole batch's prefill: every row's first token
            "prefill_tokens_per_s": sum(len(p) for p in prompts) / result.prefill_seconds,
            "decode_tokens_per_s": max(new - len(prompts), 0) / max(result.decode_seconds, 1e-9),
            "decode_steps": result.decode_steps,
            "accepted_drafts": result.accepted_drafts,
            "tp": groups.tp_size, "cp": groups.cp_size, "dp": groups.dp_size,
            "errors": {str(i): why for i, why in result.errors.items()},  # rows stopped early: their own numbers went non-finite
            **result.extra,  # serve: prompt tokens served from the prefix cache, peak cache blocks / bytes
        }
        if tokenizer is not None:
            report["text"] = [tokenizer.decode([t for t in tokens if t not in stop_tokens]) for tokens in result.tokens]
        if args.json:
            print(json.dumps(report))
        else:
            for i, (prompt, tokens) in enumerate(zip(args.prompt or prompts, result.tokens)):
                print(f"{prompt!r} -> {report['text'][i]!r}" if tokenizer is not None else f"{prompt} -> {tokens}")
                if i in result.errors:
                    print(f"  stopped early: {result.errors[i]}")
            print(f"model: {report['model']}")
            print(f"time to first token {1e3 * report['time_to_first_token_s']:.1f} ms; steady state: prefill "
                  f"{report['prefill_tokens_per_s']:.0f} tokens/s, decode {report['decode_tokens_per_s']:.0f} tokens/s "
                  f"(warm-up {1e3 * warmup_seconds:.0f} ms, not counted)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


DEMO_FAMILIES = ("gpt-oss", "llama4", "gemma3", "llama")


def _demo_config(family: str):  # noqa: ANN202 (a transformers config)
    """A tiny config of `family` (vocab 128, hidden 64, 4 / 2 heads) with the features the family is about."""
    import transformers

    common = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=None, tie_word_embeddings=False)
    if family == "gpt-oss":  # sinks, alternating sliding-window (8) / full layers, YaRN, MoE (4 experts, top 2)
        return transformers.GptOssConfig(**common, num_hidden_layers=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                         sliding_window=8, rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                                            "truncate": False, "original_max_position_embeddings": 64,
                                                                            "rope_theta": 150000.0})
    if family == "llama4":  # chunked attention (8), NoPE layers, L2 QK-norm, MoE layers with a shared expert
        return transformers.Llama4TextConfig(**common, num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=128,
                                             num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=8,
                                             use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1,
                                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    if family == "gemma3":  # local sliding-window (8) and global layers, (1 + w) norms, GeGLU, scaled embeddings
        return transformers.Gemma3TextConfig(**common, num_hidden_layers=2, intermediate_size=128, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    return transformers.LlamaConfig(**common, num_hidden_layers=2, intermediate_size=128)


def demo_checkpoint(root: Path, family: str = "llama") -> Path:
    """A tiny deterministic random checkpoint of `family` (one of DEMO_FAMILIES), saved once with save_pretrained."""
    path = root / ("tiny-llama" if family == "llama" else f"tiny-{family}")
    if (path / "config.json").exists():
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_demo_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.5 if "embed" in name else 0.15)
    model.save_pretrained(path)
    return path


DEMO_PROMPTS = ["5,17,3,44,9,1,30,2", "7,7,21,90", "33,2,5,80,14,6", "4,50,9"]


def cmd_demo(args: argparse.Namespace) -> int:
    import torch
    import transformers

    checkpoint = demo_checkpoint(Path(args.cache_dir).expanduser(), args.family)
    print(f"checkpoint: {checkpoint} (tiny random {args.family}, made with save_pretrained)")
    command = [sys.executable, "-m", "distattn.cli", "generate", "--model", str(checkpoint), "--max-new-tokens", str(args.max_new_tokens),
               "--tp", "2", "--cp", "2", "--dp", "2", "--dtype", "float64", "--json", "--prompt-ids", *DEMO_PROMPTS]
    print("running: distattn generate --tp 2 --cp 2 --dp 2 (2 processes via torchrun: CP prefill, DP decode)")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
        return done.returncode
    report = json.loads(done.stdout.strip().splitlines()[-1])
    moe = {"experts_implementation": "eager"} if args.family in ("gpt-oss", "llama4") else {}  # HF's grouped experts take no fp64
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64, **moe).eval()
    ok = True
    for text, tokens in zip(DEMO_PROMPTS, report["tokens"]):
        prompt = [int(t) for t in text.split(",")]
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        ok &= tokens == expected
        print(f"{prompt} -> {tokens} {'== HF generate' if tokens == expected else '!= HF generate ' + str(expected)}")
    print(f"model: {report['model']}")
    print(f"time to first token {1e3 * report['time_to_first_token_s']:.1f} ms; steady state: prefill {report['prefill_tokens_per_s']:.0f} "
          f"tokens/s, decode {report['decode_tokens_per_s']:.0f} tokens/s (warm-up {1e3 * report['warmup_seconds']:.0f} ms, not counted)")
    print(f"parity with HF generate: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    if "--model" in rest:  # the whole-model benchmark against HF generate
        from .model_bench import main as model_main

        model_main([a for a in rest if a != "--model"])
        return 0
    from .bench import main

    main(rest)
    return 0


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, start the engine thread, serve HTTP until interrupted."""
    config = _read_config(args.model)
    _check_launch(args)
    tp = args.tp or 1
    intermediate = config.get("intermediate_size")
    if tp < 1 or (isinstance(intermediate, int) and intermediate % tp):
        _fail(f"--tp {tp} must be >= 1 and divide the model's intermediate_size {intermediate}")
    for name in ("port", "max_running", "prefill_chunk", "block_size", "max_queue"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1")
    limit = args.max_model_len or config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit < 2:
        _fail("--max-model-len: pass the context limit (the config has no max_position_embeddings)")
    adapters: dict[str, str] = {}
    for spec in args.lora or []:
        name, _, path = spec.partition("=")
        if not name or not path:
            _fail(f"--lora {spec}: pass NAME=DIR")
        if not (Path(path) / "adapter_config.json").exists():
            _fail(f"--lora {spec}: no adapter_config.json in {path}")
        adapters[name] = path
    try:
        import uvicorn  # noqa: F401
        from fastapi import FastAPI  # noqa: F401
    except ImportError:
        _fail('distattn serve needs FastAPI and uvicorn: pip install "distattn[serve]"')
    if tp > 1 and "RANK" not in os.environ:  # re-launch through torchrun: rank 0 serves HTTP, every rank steps the engine
        return _relaunch(tp)
    import torch
    import torch.distributed as dist
    import uvicorn

    from .lora import LoraAdapter
    from .models import DecoderLM
    from .models.generate import _stop_set
    from .models.serving import Engine
    from .parallel import ParallelGroups
    from .server import EngineLoop, Served, create_app

    groups, broadcast, rank = ParallelGroups(), None, 0
    if tp > 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
        groups, rank = ParallelGroups.from_world(), dist.get_rank()

        def broadcast(ops: list) -> list:  # rank 0's operations of one engine iteration, to every rank
            box = [ops]
            dist.broadcast_object_list(box, src=0)
            return box[0]

    dtype_name = DTYPES[args.dtype] if args.dtype else str(config.get("dtype") or config.get("torch_dtype") or "float32")
    dtype = getattr(torch, dtype_name)
    model = DecoderLM.from_pretrained(args.model, groups=groups, dtype=dtype, quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype)
    if adapters:
        model.load_lora_adapters([LoraAdapter(path, name=name) for name, path in adapters.items()])
    engine = Engine(model, max_seq_len=limit, max_running=args.max_running, prefill_chunk=args.prefill_chunk, block_size=args.block_size,
                    draft=args.draft)
    loop = EngineLoop(engine, args.max_queue, broadcast=broadcast, rank=rank)
    if rank != 0:  # no HTTP here: the same engine steps as rank 0, until the job ends
        loop.run()
        return 0
    loop.start()
    served = Served(loop, _tokenizer(args.model), args.served_model_name or args.model, {n: i for i, n in enumerate(adapters)}, limit,
                    model.config.vocab_size, _stop_set(model, None))
    print(f"distattn serve: {model.describe()}; max_model_len {limit}; http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `distattn` argument parser (generate, demo, bench)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="distattn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"distattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from a checkpoint directory", formatter_class=_Defaults)
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    gen.add_argument("--prompt", action="append", help="prompt text (needs the checkpoint's tokenizer); repeat for a batch")
    gen.add_argument("--prompt-ids", nargs="+", help="prompts as comma-separated token ids, one argument per prompt")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt (fewer where a row stops)")
    gen.add_argument("--tp", type=int, default=None, help="processes (tensor-parallel ranks); >1 launches torchrun (1 if not given)")
    gen.add_argument("--cp", type=int, default=None, help="context-parallel degree of prefill (divides --tp; 1 if not given)")
    gen.add_argument("--dp", type=int, default=None, help="data-parallel degree of decode (divides --tp and the batch; 1 if not given)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0: greedy; default: the checkpoint's generation_config.json (greedy unless it samples)")
    gen.add_argument("--top-p", type=float, default=None, help="default: generation_config.json's, else 1")
    gen.add_argument("--stop", type=int, nargs="+", help="token ids that also end a row (besides the checkpoint's end tokens)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--draft", choices=["none", "prompt_lookup", "model"], default="none", help="speculative drafts (greedy only)")
    gen.add_argument("--draft-model", help="with --draft model: a smaller checkpoint directory with the same vocabulary")
    gen.add_argument("--compile", action="store_true", help="decode steps through torch.compile (tp 1; compile time is in the warm-up)")
    gen.add_argument("--quantize", choices=["int8", "int4"], help="int8 (per-row scales) or int4 (per-32 scales and zeros) weights")
    gen.add_argument("--kv-cache-dtype", choices=["fp8", "int8"], help="store the KV cache as fp8 (e4m3) or int8 (a scale per token and head); default: --dtype")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--paged", action="store_true", help="serve over the paged KV cache (continuous batching, prefix caching)")
    gen.add_argument("--max-running", type=int, default=8, help="--paged: requests in the batch at once")
    gen.add_argument("--prefill-chunk", type=int, default=64, help="--paged: prompt tokens a request feeds per step")
    gen.add_argument("--block-size", type=int, default=16, help="--paged: positions per KV cache block")
    gen.add_argument("--lora", nargs="+", help="PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors)")
    gen.add_argument("--adapter-ids", type=int, nargs="+", help="with --lora: the adapter of each prompt (index, -1 for none); default 0")
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)", formatter_class=_Defaults)
    srv.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors; a tokenizer for text prompts)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", help="the model id clients name (default: --model as given)")
    srv.add_argument("--max-model-len", type=int, help="prompt + completion limit (default: the config's max_position_embeddings)")
    srv.add_argument("--max-running", type=int, default=8, help="requests in the batch at once")
    srv.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens a request feeds per step")
    srv.add_argument("--block-size", type=int, default=16, help="positions per KV cache block")
    srv.add_argument("--max-queue", type=int, default=256, help="requests waiting or running before new ones get 429")
    srv.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")
    srv.add_argument("--quantize", choices=["int8", "int4"], help="int8 (per-row scales) or int4 (per-32 scales and zeros) weights")
    srv.add_argument("--kv-cache-dtype", choices=["fp8", "int8"], help="store the KV cache as fp8 (e4m3) or int8 (a scale per token and head); default: --dtype")
    srv.add_argument("--draft", choices=["none", "prompt_lookup"], default="none",
                     help="prompt-lookup speculation (greedy requests only: temperature 0)")
    srv.add_argument("--lora", nargs="+", help="PEFT adapters as NAME=DIR: clients name them as the model")
    srv.add_argument("--tp", type=int, default=None, help="tensor-parallel processes (>1 launches torchrun; rank 0 serves HTTP)")
    demo = sub.add_parser("demo", help="the built-in default: tiny model, 2 processes, parity with HF generate",
                          formatter_class=_Defaults)
    demo.add_argument("--cache-dir", default=os.environ.get("DISTATTN_CACHE", "~/.cache/distattn"))
    demo.add_argument("--max-new-tokens", type=int, default=16, help="new tokens per prompt")
    demo.add_argument("--family", choices=DEMO_FAMILIES, default="gpt-oss",
                      help="gpt-oss: sinks, sliding window, MoE; llama4: chunked attention, NoPE, MoE; gemma3: local / global layers")
    sub.add_parser("bench", help="the kernel benchmark against HF transformers (options: distattn bench --help); "
                   "--model: whole-model generate against HF generate", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        return cmd_bench(parser.parse_args(["bench"]), argv[1:])
    args = parser.parse_args(argv)
    try:
        return {"generate": cmd_generate, "demo": cmd_demo, "serve": cmd_serve}[args.command](args)
    except (ValueError, TypeError) as err:  # a library check refused what was asked: the message says what to change
        if os.environ.get("DISTATTN_DEBUG"):
            raise
        _fail(str(err))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
