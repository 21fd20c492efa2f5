"""Command-line checks that need no model: every mistake is `distattn: error: ...` and exit status 2,
before any process starts or any weight is read."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def fail(message: str) -> NoReturn:
    """Refuse the command: one line on stderr, exit status 2."""
    # one write call: under torchrun (unbuffered) print's text and newline are two, and ranks refusing alike interleave
    sys.stderr.write(f"distattn: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def tokenizer_of(model: str) -> Any:
    """The checkpoint's tokenizer, or None when it has none."""
    if not (Path(model) / "tokenizer_config.json").exists() and not (Path(model) / "tokenizer.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, local_files_only=True)


def prompts_of(args: argparse.Namespace) -> tuple[list[list[int]], Any]:
    """(prompt token ids, the tokenizer that made them: None for --prompt-ids)."""
    if args.prompt_ids:
        try:
            return [[int(t) for t in group.split(",") if t.strip()] for group in args.prompt_ids], None
        except ValueError:
            fail(f"--prompt-ids takes comma-separated integers, e.g. --prompt-ids 1,2,3 (got {args.prompt_ids})")
    tokenizer = tokenizer_of(args.model)
    if tokenizer is None:
        fail(f"--prompt needs a tokenizer in {args.model}; this checkpoint has none: pass --prompt-ids instead")
    return [tokenizer(p)["input_ids"] for p in args.prompt], tokenizer


def read_config(model: str, option: str = "--model") -> dict:
    path = Path(model) / "config.json"
    if not path.exists():
        fail(f"{option} {model}: no config.json there; pass a checkpoint directory saved with save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{option} {model}: config.json is not valid JSON ({err})")
    if not isinstance(config, dict):
        fail(f"{option} {model}: config.json must hold a JSON object")
    return config


def generation_defaults(model: str) -> dict:
    """generation_config.json's sampling defaults, as HF generate applies them (greedy unless do_sample)."""
    path = Path(model) / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"--model {model}: generation_config.json is not valid JSON ({err})")
    if not config.get("do_sample"):
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": float(config.get("temperature", 1.0)), "top_p": float(config.get("top_p", 1.0))}


def check_generate_args(args: argparse.Namespace) -> tuple[list[list[int]], Any]:
    """Every check of `distattn generate` that needs no model: options, files, and what the prompts must fit
    (exit 2 before any process starts); returns `prompts_of(args)`."""
    config = read_config(args.model)
    _check_generate_options(args, config)
    _check_device(args.device)
    prompts, tokenizer = prompts_of(args)
    _check_prompts(args, config, prompts)
    return prompts, tokenizer


def _check_generate_options(args: argparse.Namespace, config: dict) -> None:
    if not args.prompt and not args.prompt_ids:
        fail("pass --prompt TEXT (checkpoints with a tokenizer) or --prompt-ids 1,2,3")
    if args.prompt and args.prompt_ids:
        fail("pass --prompt or --prompt-ids, not both")
    tp = _check_parallel(args, config)
    if args.max_new_tokens < 1:
        fail("--max-new-tokens must be >= 1")
    if args.temperature is not None and not 0 <= args.temperature < float("inf"):
        fail(f"--temperature {args.temperature}: pass a number >= 0 (0: greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        fail(f"--top-p {args.top_p}: pass a number in (0, 1]")
    _check_adapters(args)
    if (args.draft == "model") != (args.draft_model is not None):
        fail("--draft model and --draft-model DIR go together")
    if args.draft_model is not None:
        read_config(args.draft_model, "--draft-model")
    if args.draft != "none" and (args.temperature or 0.0) != 0.0:
        fail("speculative drafts (--draft) are verified greedily: drop --temperature or pass --temperature 0")
    if args.draft == "model" and args.paged:
        fail("--paged drafts with --draft prompt_lookup; --draft model runs without --paged")
    if args.paged and (args.dp or 1) > 1:
        fail("--paged does not support data-parallel decode: drop --dp or --paged")
    if args.compile and tp > 1:
        fail(f"--compile runs at --tp 1 (got --tp {tp}): drop one of them")
    _check_positive(args, ("max_running", "prefill_chunk", "block_size"))


def _check_parallel(args: argparse.Namespace, config: dict) -> int:
    """--tp / --cp / --dp against each other and the model; returns tp."""
    for name in ("tp", "cp", "dp"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be >= 1")
    tp, cp, dp = args.tp or 1, args.cp or 1, args.dp or 1
    if tp % cp or tp % dp:
        fail(f"--cp ({cp}) and --dp ({dp}) must divide --tp ({tp}): they split the tp ranks")
    intermediate = config.get("intermediate_size")
    if isinstance(intermediate, int) and intermediate % tp:
        fail(f"--tp {tp} does not divide the model's intermediate_size {intermediate} (the MLP is split across the tp ranks): "
             f"pick a divisor of it")
    return tp


def _check_adapters(args: argparse.Namespace) -> None:
    if args.adapter_ids is not None and not args.lora:
        fail("--adapter-ids picks among --lora adapters: pass --lora DIR [DIR ...] too")
    if args.lora and args.adapter_ids is not None and any(not -1 <= a < len(args.lora) for a in args.adapter_ids):
        fail(f"--adapter-ids {args.adapter_ids}: each must be -1 (no adapter) or below the {len(args.lora)} --lora adapters")
    for adapter in args.lora or []:
        if not (Path(adapter) / "adapter_config.json").exists():
            fail(f"--lora {adapter}: no adapter_config.json there; pass a directory saved by PEFT's save_pretrained")


def _check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")


def _check_port(host: str, port: int) -> None:
    """A port this process can listen on, before any model is loaded."""
    import socket

    if not 1 <= port <= 65535:
        fail(f"--port {port}: pass a TCP port in 1-65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        fail(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); pick a free port or another host")


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail(f"--device {device}: this machine has no CUDA device (or this torch build has no CUDA): use --device cpu")
    elif device != "cpu":
        fail(f"--device {device}: use cpu or cuda")


def _check_prompts(args: argparse.Namespace, config: dict, prompts: list[list[int]]) -> None:
    if any(not p for p in prompts):
        fail("every prompt needs at least one token")
    vocab = config.get("vocab_size")
    if isinstance(vocab, int):
        bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab})
        if bad:
            fail(f"prompt token ids {bad[:8]} are outside the model's vocabulary [0, {vocab})")
    for token in args.stop or []:
        if isinstance(vocab, int) and not 0 <= token < vocab:
            fail(f"--stop {token} is outside the model's vocabulary [0, {vocab})")
    dp = args.dp or 1
    if dp > 1 and len(prompts) % dp:
        fail(f"--dp {dp} splits the batch: pass a multiple of {dp} prompts (got {len(prompts)})")
    if args.lora and args.adapter_ids is not None and len(args.adapter_ids) != len(prompts):
        fail(f"--adapter-ids has {len(args.adapter_ids)} entries for {len(prompts)} prompts; pass one per prompt")


def check_serve_args(args: argparse.Namespace) -> tuple[dict, int, dict[str, str]]:
    """Every check of `distattn serve` that needs no model; returns (config.json, the context limit, adapters by name)."""
    config = read_config(args.model)
    check_launch(args)
    tp = args.tp or 1
    intermediate = config.get("intermediate_size")
    if tp < 1 or (isinstance(intermediate, int) and intermediate % tp):
        fail(f"--tp {tp} must be >= 1 and divide the model's intermediate_size {intermediate}")
    _check_positive(args, ("max_running", "prefill_chunk", "block_size", "max_queue"))
    _check_port(args.host, args.port)
    if args.max_model_len is not None and args.max_model_len < 2:
        fail(f"--max-model-len {args.max_model_len}: pass at least 2 (a prompt token and a new one)")
    limit = args.max_model_len or config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit < 2:
        fail("--max-model-len: pass the context limit (the config has no usable max_position_embeddings)")
    adapters: dict[str, str] = {}
    for spec in args.lora or []:
        name, _, path = spec.partition("=")
        if not name or not path:
            fail(f"--lora {spec}: pass NAME=DIR")
        if not (Path(path) / "adapter_config.json").exists():
            fail(f"--lora {spec}: no adapter_config.json in {path}")
        adapters[name] = path
    try:
        import uvicorn  # noqa: F401
        from fastapi import FastAPI  # noqa: F401
    except ImportError:
        fail('distattn serve needs FastAPI and uvicorn: pip install "distattn[serve]"')
    return config, limit, adapters


def check_launch(args: argparse.Namespace) -> None:
    """Under torchrun (or any launcher setting WORLD_SIZE), --tp must name the world size: several processes
    without it would each run the whole model and print everything twice."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.tp is None:
        fail(f"running under a launcher with {world} processes: pass --tp {world} (and --cp / --dp as wanted), "
              "or run `distattn generate --tp N` without torchrun: it launches its own processes")
    if "RANK" in os.environ and args.tp is not None and args.tp != world:
        fail(f"--tp {args.tp} but the launcher started {world} processes: pass --tp {world} or launch {args.tp} processes")


