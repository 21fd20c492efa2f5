"""Serving under load: `distattn serve` against HF transformers' own `transformers serve`, same checkpoint.

    python benchmarks/serve_bench.py [--clients 8] [--requests 32] [--prompt 128] [--max-tokens 32] [--smoke]

A random Llama checkpoint (vocab 32000, hidden 512, 4 layers) with a word-level tokenizer is
saved with `save_pretrained`; each server is started in turn on a free local port, and
`--clients` concurrent streaming clients send `--requests` completions (text prompts of
`--prompt` words, greedy, `--max-tokens` each). Reported per server: throughput (output
tokens / wall time), time to first token and inter-token latency (p50 / p99), and the
ratios peer / ours. HF runs with `--continuous-batching` when it starts that way, else its
default. Writes benchmarks/results/serve_bench.json. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=2048, eos_token_id=None, bos_token_id=1)


def save_checkpoint(path: Path, vocab: int) -> Path:
    """The random checkpoint with a word-level tokenizer ("w0" ... "w{vocab-1}")."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**MODEL, "vocab_size": vocab})).save_pretrained(path)
    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", bos_token="w1", eos_token="w2", pad_token="w0")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(path)
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, log: Path) -> subprocess.Popen | None:
    """Start a server; None when it does not answer /health within 3 minutes."""
    import httpx

    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    return None


async def load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """Run the prompts through `clients` concurrent streaming clients; per-request TTFT, inter-token gaps, tokens."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttft, gaps, tokens, failures = [], [], 0, 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            start, last = time.perf_counter(), None
            try:
                async with http.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        failures += 1
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data:") or line.strip() == "data: [DONE]":
                            continue
                        choice = json.loads(line[5:])["choices"][0]
                        if not choice.get("text"):
                            continue
                        now = time.perf_counter()
                        if last is None:
                            ttft.append(now - start)
                        else:
                            gaps.append(now - last)
                        last = now
                        tokens += len(choice["text"].split())
            except httpx.HTTPError:
                failures += 1

    begin = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - begin

    def pct(values: list[float], q: float) -> float:
        return 1e3 * statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")

    return {"wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall, "failures": failures,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128, help="prompt words")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="a tiny vocabulary and load (seconds; for tests)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    vocab = 1000 if args.smoke else MODEL["vocab_size"]
    if args.smoke:
        args.clients, args.requests, args.prompt, args.max_tokens = 2, 4, 16, 4
    results: dict = {"load": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        root = save_checkpoint(Path(tmp) / "model", vocab)
        prompts = [" ".join(f"w{(7 * i + 13 * j) % (vocab - 3) + 3}" for j in range(args.prompt)) for i in range(args.requests)]
        servers = {"distattn": lambda port: [sys.executable, "-m", "distattn.cli", "serve", "--model", str(root), "--port", str(port),
                                             "--served-model-name", "bench", "--max-running", str(args.clients)]}
        if not args.smoke:
            servers["transformers serve"] = lambda port: ["transformers", "serve", str(root), "--port", str(port), "--continuous-batching",
                                                          "--device", "cpu", "--dtype", "float32"]
        for name, command in servers.items():
            port = _port()
            url = f"http://127.0.0.1:{port}"
            proc = start(command(port), url, Path(tmp) / f"{name.replace(' ', '_')}.log")
            if proc is None:
                results[name] = {"error": "did not start: " + (Path(tmp) / f"{name.replace(' ', '_')}.log").read_text()[-400:]}
                print(f"{name}: did not start", flush=True)
                continue
            try:
                model = "bench" if name == "distattn" else str(root)
                asyncio.run(load(url, model, prompts[: args.clients], args.clients, args.max_tokens))  # warm-up
                results[name] = asyncio.run(load(url, model, prompts, args.clients, args.max_tokens))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            r = results[name]
            print(f"{name}: {r['tokens_per_s']:.1f} tokens/s, TTFT p50 {r['ttft_p50_ms']:.0f} / p99 {r['ttft_p99_ms']:.0f} ms, "
                  f"ITL p50 {r['itl_p50_ms']:.1f} / p99 {r['itl_p99_ms']:.1f} ms, {r['failures']} failed", flush=True)
    peer = results.get("transformers serve", {})
    if "tokens_per_s" in peer and "tokens_per_s" in results.get("distattn", {}):
        ours = results["distattn"]
        results["ratios_peer_over_ours"] = {"throughput": ours["tokens_per_s"] / peer["tokens_per_s"],
                                            "ttft_p50": peer["ttft_p50_ms"] / ours["ttft_p50_ms"], "itl_p50": peer["itl_p50_ms"] / ours["itl_p50_ms"]}
        print("ours / peer throughput {throughput:.2f}x; peer / ours TTFT p50 {ttft_p50:.2f}x, ITL p50 {itl_p50:.2f}x".format(
            **results["ratios_peer_over_ours"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("serve_bench_smoke.json" if args.smoke else "serve_bench.json")).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
