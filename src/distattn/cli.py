"""The `distattn` command line: generate, demo, bench.

    distattn demo                          the built-in default: a tiny model, 2 processes, checked against HF
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

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def _fail(message: str) -> None:
    print(f"distattn: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    if args.prompt_ids:
        try:
            return [[int(t) for t in group.split(",") if t.strip()] for group in args.prompt_ids]
        except ValueError:
            _fail(f"--prompt-ids takes comma-separated integers, e.g. --prompt-ids 1,2,3 (got {args.prompt_ids})")
    if not (Path(args.model) / "tokenizer_config.json").exists() and not (Path(args.model) / "tokenizer.json").exists():
        _fail(f"--prompt needs a tokenizer in {args.model}; this checkpoint has none: pass --prompt-ids instead")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    return [tokenizer(p)["input_ids"] for p in args.prompt]


def _check_generate_args(args: argparse.Namespace) -> None:
    model = Path(args.model)
    if not (model / "config.json").exists():
        _fail(f"--model {args.model}: no config.json there; pass a checkpoint directory saved with save_pretrained")
    if not args.prompt and not args.prompt_ids:
        _fail("pass --prompt TEXT (checkpoints with a tokenizer) or --prompt-ids 1,2,3")
    for name in ("tp", "cp", "dp"):
        if getattr(args, name) < 1:
            _fail(f"--{name} must be >= 1")
    if args.tp % args.cp or args.tp % args.dp:
        _fail(f"--cp ({args.cp}) and --dp ({args.dp}) must divide --tp ({args.tp}): they split the tp ranks")
    if args.max_new_tokens < 1:
        _fail("--max-new-tokens must be >= 1")
    if args.adapter_ids is not None and not args.lora:
        _fail("--adapter-ids picks among --lora adapters: pass --lora DIR [DIR ...] too")
    if args.lora and args.adapter_ids is not None and any(not -1 <= a < len(args.lora) for a in args.adapter_ids):
        _fail(f"--adapter-ids {args.adapter_ids}: each must be -1 (no adapter) or below the {len(args.lora)} --lora adapters")
    if (args.draft == "model") != (args.draft_model is not None):
        _fail("--draft model and --draft-model DIR go together")
    if args.draft == "model" and args.paged:
        _fail("--paged drafts with --draft prompt_lookup; --draft model runs without --paged")
    if args.compile and args.tp > 1:
        _fail(f"--compile runs at --tp 1 (got --tp {args.tp}): drop one of them")
    if args.paged and args.dp > 1:
        _fail("--paged does not support data-parallel decode: drop --dp or --paged")
    for name in ("max_running", "prefill_chunk", "block_size"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1")


def cmd_generate(args: argparse.Namespace) -> int:
    _check_generate_args(args)
    if args.tp > 1 and "RANK" not in os.environ:  # re-launch through torchrun, one process per rank
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.tp),
                   "-m", "distattn.cli", *sys.argv[1:]]
        return subprocess.call(command)
    import torch
    import torch.distributed as dist

    from .models import DecoderLM, generate, serve
    from .parallel import ParallelGroups

    prompts = _prompts(args)
    device = torch.device(args.device)
    groups = ParallelGroups()
    if args.tp > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=300))
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        groups = ParallelGroups.from_world(cp_degree=args.cp, dp_degree=args.dp)
    if args.dp > 1 and len(prompts) % args.dp:
        _fail(f"--dp {args.dp} splits the batch: pass a multiple of {args.dp} prompts (got {len(prompts)})")
    adapter_ids = None
    if args.lora:
        adapter_ids = args.adapter_ids if args.adapter_ids is not None else [0] * len(prompts)
        if len(adapter_ids) != len(prompts):
            _fail(f"--adapter-ids has {len(adapter_ids)} entries for {len(prompts)} prompts; pass one per prompt")
    dtype = getattr(torch, DTYPES[args.dtype])
    model = DecoderLM.from_pretrained(args.model, groups=groups, dtype=dtype, pack=False if args.compile else None).to(device)
    if args.lora:
        model.load_lora_adapters(args.lora)
    if args.compile:
        model.compile_decode()
    rank = dist.get_rank() if dist.is_initialized() else 0
    progress = None
    if rank == 0 and not args.json:
        from tqdm import tqdm

        progress = tqdm(total=len(prompts) * args.max_new_tokens, desc="generating", unit="tok", file=sys.stderr)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
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
            **result.extra,  # serve: prompt tokens served from the prefix cache, peak cache blocks / bytes
        }
        if args.json:
            print(json.dumps(report))
        else:
            for prompt, tokens in zip(prompts, result.tokens):
                print(f"{prompt} -> {tokens}")
            print(f"model: {report['model']}")
            print(f"time to first token {1e3 * report['time_to_first_token_s']:.1f} ms; steady state: prefill "
                  f"{report['prefill_tokens_per_s']:.0f} tokens/s, decode {report['decode_tokens_per_s']:.0f} tokens/s "
                  f"(warm-up {1e3 * warmup_seconds:.0f} ms, not counted)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def demo_checkpoint(root: Path) -> Path:
    """A tiny deterministic random Llama checkpoint, saved once with save_pretrained."""
    path = root / "tiny-llama"
    if (path / "config.json").exists():
        return path
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
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

    checkpoint = demo_checkpoint(Path(args.cache_dir).expanduser())
    print(f"checkpoint: {checkpoint} (tiny random Llama, made with save_pretrained)")
    command = [sys.executable, "-m", "distattn.cli", "generate", "--model", str(checkpoint), "--max-new-tokens", str(args.max_new_tokens),
               "--tp", "2", "--cp", "2", "--dp", "2", "--dtype", "float64", "--json", "--prompt-ids", *DEMO_PROMPTS]
    print("running: distattn generate --tp 2 --cp 2 --dp 2 (2 processes via torchrun: CP prefill, DP decode)")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
        return done.returncode
    report = json.loads(done.stdout.strip().splitlines()[-1])
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64).eval()
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


def build_parser() -> argparse.ArgumentParser:
    """The `distattn` argument parser (generate, demo, bench)."""
    parser = argparse.ArgumentParser(prog="distattn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from a checkpoint directory")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    gen.add_argument("--prompt", action="append", help="prompt text (needs the checkpoint's tokenizer); repeat for a batch")
    gen.add_argument("--prompt-ids", nargs="+", help="prompts as comma-separated token ids, one argument per prompt")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--tp", type=int, default=1, help="processes (tensor-parallel ranks); >1 launches torchrun")
    gen.add_argument("--cp", type=int, default=1, help="context-parallel degree of prefill (divides --tp)")
    gen.add_argument("--dp", type=int, default=1, help="data-parallel degree of decode (divides --tp and the batch)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--draft", choices=["none", "prompt_lookup", "model"], default="none", help="speculative drafts (greedy only)")
    gen.add_argument("--draft-model", help="with --draft model: a smaller checkpoint directory with the same vocabulary")
    gen.add_argument("--compile", action="store_true", help="decode steps through torch.compile (tp 1; compile time is in the warm-up)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--paged", action="store_true", help="serve over the paged KV cache (continuous batching, prefix caching)")
    gen.add_argument("--max-running", type=int, default=8, help="--paged: requests in the batch at once")
    gen.add_argument("--prefill-chunk", type=int, default=64, help="--paged: prompt tokens a request feeds per step")
    gen.add_argument("--block-size", type=int, default=16, help="--paged: positions per KV cache block")
    gen.add_argument("--lora", nargs="+", help="PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors)")
    gen.add_argument("--adapter-ids", type=int, nargs="+", help="with --lora: the adapter of each prompt (index, -1 for none); default 0")
    demo = sub.add_parser("demo", help="the built-in default: tiny model, 2 processes, parity with HF generate")
    demo.add_argument("--cache-dir", default=os.environ.get("DISTATTN_CACHE", "~/.cache/distattn"))
    demo.add_argument("--max-new-tokens", type=int, default=16)
    sub.add_parser("bench", help="the kernel benchmark against HF transformers (options: distattn bench --help); "
                   "--model: whole-model generate against HF generate", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        return cmd_bench(parser.parse_args(["bench"]), argv[1:])
    args = parser.parse_args(argv)
    return cmd_generate(args) if args.command == "generate" else cmd_demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
