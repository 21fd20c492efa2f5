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
import sys
import time
from typing import Any

from .demo import DEMO_FAMILIES, cmd_demo, demo_checkpoint
from .options import DTYPES, check_generate_args, check_launch, check_serve_args, fail, generation_defaults, tokenizer_of

__all__ = ["build_parser", "demo_checkpoint", "main"]


def cmd_generate(args: argparse.Namespace) -> int:
    """`distattn generate`: check everything, launch the ranks, load, warm up, generate, report."""
    prompts, tokenizer = check_generate_args(args)
    check_launch(args)
    tp = args.tp or 1
    if tp > 1 and "RANK" not in os.environ:  # re-launch through torchrun, one process per rank
        from .launch import relaunch

        return relaunch(tp)
    import torch

    from .launch import load_model, start_world

    world = start_world(tp, args.device, cp=args.cp or 1, dp=args.dp or 1)
    dtype = getattr(torch, DTYPES[args.dtype])
    model = load_model(args.model, world, dtype, adapters=args.lora or (), pack=False if args.compile else None,
                       quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype)
    if args.compile:
        model.compile_decode()
    draft_model = None if args.draft_model is None else load_model(args.draft_model, world, dtype)
    report = _generate(args, model, draft_model, prompts, world.rank)
    if world.rank == 0:
        _print_report(args, report, prompts, tokenizer)
    world.stop()
    return 0


def _generate(args: argparse.Namespace, model: Any, draft_model: Any, prompts: list[list[int]], rank: int) -> dict:
    """Warm up (timed apart: first calls pay for thread pools, allocations and kernel choices), then generate."""
    from ..runtime.engine import serve
    from ..runtime.generate import generate
    from ..runtime.sampler import stop_tokens_of

    adapter_ids = (args.adapter_ids if args.adapter_ids is not None else [0] * len(prompts)) if args.lora else None
    progress = None
    if rank == 0 and not args.json:
        from tqdm import tqdm

        progress = tqdm(total=len(prompts) * args.max_new_tokens, desc="generating", unit="tok", file=sys.stderr)
    sampling = generation_defaults(args.model)  # the checkpoint's, where the user gave none (as HF generate)
    temperature = sampling["temperature"] if args.temperature is None else args.temperature
    top_p = sampling["top_p"] if args.top_p is None else args.top_p
    if args.draft != "none":
        temperature = 0.0  # speculation verifies greedily (an explicit --temperature > 0 was refused above)
    stop_tokens = sorted(stop_tokens_of(model, None) | set(args.stop or []))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=top_p, seed=args.seed, stop_tokens=stop_tokens,
                   draft=args.draft, adapter_ids=adapter_ids, on_tokens=progress.update if progress is not None else None)
    tic = time.perf_counter()
    rows = model.groups.dp_size  # the fewest prompts a call can split over the data-parallel replicas
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
    new = sum(len(t) for t in result.tokens)
    groups = model.groups
    return {
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
        "stop_tokens": stop_tokens,
        **result.extra,  # serve: prompt tokens served from the prefix cache, peak cache blocks / bytes
    }


def _print_report(args: argparse.Namespace, report: dict, prompts: list[list[int]], tokenizer: Any) -> None:
    """The tokens (and text), the model and the speeds: one JSON object with --json, else lines."""
    stop_tokens = report.pop("stop_tokens")
    if tokenizer is not None:
        report["text"] = [tokenizer.decode([t for t in tokens if t not in stop_tokens]) for tokens in report["tokens"]]
    if args.json:
        print(json.dumps(report))
        return
    for i, (prompt, tokens) in enumerate(zip(args.prompt or prompts, report["tokens"])):
        print(f"{prompt!r} -> {report['text'][i]!r}" if tokenizer is not None else f"{prompt} -> {tokens}")
        if str(i) in report["errors"]:
            print(f"  stopped early: {report['errors'][str(i)]}")
    print(f"model: {report['model']}")
    print(f"time to first token {1e3 * report['time_to_first_token_s']:.1f} ms; steady state: prefill "
          f"{report['prefill_tokens_per_s']:.0f} tokens/s, decode {report['decode_tokens_per_s']:.0f} tokens/s "
          f"(warm-up {1e3 * report['warmup_seconds']:.0f} ms, not counted)")


def cmd_serve(args: argparse.Namespace) -> int:
    """`distattn serve`: load the model, start the engine thread, serve HTTP until interrupted."""
    config, limit, adapters = check_serve_args(args)
    tp = args.tp or 1
    if tp > 1 and "RANK" not in os.environ:  # re-launch through torchrun: rank 0 serves HTTP, every rank steps the engine
        from .launch import relaunch

        return relaunch(tp)
    import torch
    import uvicorn

    from ..layers.lora import LoraAdapter
    from ..parallel.comm import broadcast_object
    from ..runtime.engine import Engine
    from ..runtime.sampler import stop_tokens_of
    from .engine_loop import EngineLoop
    from .launch import load_model, start_world
    from .server import Served, create_app

    world = start_world(tp, "cpu", backend="gloo")
    dtype_name = DTYPES[args.dtype] if args.dtype else str(config.get("dtype") or config.get("torch_dtype") or "float32")
    model = load_model(args.model, world, getattr(torch, dtype_name), adapters=[LoraAdapter(path, name=name) for name, path in adapters.items()],
                       quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype)
    engine = Engine(model, max_seq_len=limit, max_running=args.max_running, prefill_chunk=args.prefill_chunk, block_size=args.block_size,
                    draft=args.draft)
    # under tensor parallelism rank 0's operations of each engine iteration reach every rank
    loop = EngineLoop(engine, args.max_queue, broadcast=broadcast_object if tp > 1 else None, rank=world.rank)
    if world.rank != 0:  # no HTTP here: the same engine steps as rank 0, until the job ends
        loop.run()
        return 0
    loop.start()
    served = Served(loop, tokenizer_of(args.model), args.served_model_name or args.model, {n: i for i, n in enumerate(adapters)}, limit,
                    model.config.vocab_size, stop_tokens_of(model, None))
    print(f"distattn serve: {model.describe()}; max_model_len {limit}; http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="warning")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The `distattn` argument parser (generate, demo, bench)."""
    from .. import __version__

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
        fail(str(err))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
