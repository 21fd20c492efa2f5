"""`distattn serve` under a load generator someone else wrote: GuideLLM (vLLM project) with its own request shapes.

    python benchmarks/load_generator_bench.py [--guidellm PATH] [--streams 8] [--requests 64] [--out benchmarks/results]

GuideLLM is not a dependency of distattn (it pins its own stack); install it apart, e.g.
`python -m venv --system-site-packages /tmp/gl && /tmp/gl/bin/pip install guidellm==0.8.1`, and pass
`--guidellm /tmp/gl/bin/guidellm`. A random Llama checkpoint (4 layers, hidden 256, vocab 2048) with a
byte-level BPE tokenizer trained here on Python's own documentation text (GuideLLM's synthetic prompts need a
real tokenizer; no download) is saved with `save_pretrained`, served on a free local port, and GuideLLM runs
twice with its defaults but for the target, the data (`synthetic_text`, 128 prompt / 64 output tokens) and a
request budget: once on /v1/completions, once on /v1/chat/completions. GuideLLM sends what load generators send:
`stream_options: {"include_usage": true, "continuous_usage_stats": true}`, `max_completion_tokens`,
`ignore_eos`, chat `content` as an array of text parts. Reported from GuideLLM's own benchmarks.json: requests
completed and errored, output tokens/s, time to first token and inter-token latency (median, p95). Writes
load_generator_bench.json. The server is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import pydoc
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def checkpoint(root: Path) -> Path:
    """The served checkpoint: random weights, a BPE tokenizer trained on local text, a chat template."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [pydoc.render_doc(m, renderer=pydoc.plaintext) for m in (json, os, socket, subprocess, argparse, tempfile)]
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    raw.train_from_iterator(text, trainers.BpeTrainer(vocab_size=2048, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|end|>", pad_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    path = root / "served"
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "distattn.cli", "serve", "--model", str(path), "--served-model-name", "served",
                             "--port", str(port), "--max-model-len", "1024", "--max-running", "16", "--max-queue", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    import httpx

    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not come up: " + (proc.stdout.read() if proc.stdout else ""))


def run_guidellm(guidellm: str, port: int, path: Path, endpoint: str, streams: int, requests: int, out: Path) -> dict:
    """One GuideLLM run; its headline figures from its own benchmarks.json."""
    out.mkdir(parents=True, exist_ok=True)
    command = [guidellm, "run", "--backend", f"kind=openai_http,target=http://127.0.0.1:{port},model=served,request_format={endpoint}",
               "--profile", f"kind=concurrent,streams={streams}", "--constraint", f"kind=max_requests,count={requests}",
               "--data", "kind=synthetic_text,prompt_tokens=128,output_tokens=64", "--tokenizer", f"kind=hf_auto,model={path}",
               "--output", f"kind=json,path={out / 'benchmarks.json'}", "--disable-console-interactive"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=out)
    if done.returncode != 0:
        raise RuntimeError(f"guidellm failed ({endpoint}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    bench = json.loads((out / "benchmarks.json").read_text())["benchmarks"][0]
    requests_made = bench["requests"]
    metrics = bench["metrics"]

    def stat(name: str, key: str) -> float:
        """A statistic of the successful requests ("median", "mean", or a percentile such as "p95")."""
        values = metrics[name]["successful"]
        return float(values["percentiles"][key] if key.startswith("p") else values[key])

    return {
        "endpoint": endpoint, "completed": len(requests_made.get("successful", [])), "errored": len(requests_made.get("errored", [])),
        "incomplete": len(requests_made.get("incomplete", [])), "output_tokens_per_second": stat("output_tokens_per_second", "mean"),
        "ttft_ms_median": stat("time_to_first_token_ms", "median"), "ttft_ms_p95": stat("time_to_first_token_ms", "p95"),
        "itl_ms_median": stat("inter_token_latency_ms", "median"), "itl_ms_p95": stat("inter_token_latency_ms", "p95"),
        "prompt_tokens_median": stat("prompt_token_count", "median"), "output_tokens_median": stat("output_token_count", "median"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guidellm", default=shutil.which("guidellm") or "guidellm", help="the guidellm executable")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(Path(tmp))
        port = free_port()
        server = start_server(path, port)
        try:
            runs = [run_guidellm(args.guidellm, port, path, endpoint, args.streams, args.requests, Path(tmp) / endpoint.strip("/").replace("/", "_"))
                    for endpoint in ("/v1/completions", "/v1/chat/completions")]
        finally:
            server.terminate()
            server.wait(timeout=30)
    report = {"guidellm": subprocess.run([args.guidellm, "--version"], capture_output=True, text=True).stdout.strip(),
              "streams": args.streams, "requests": args.requests, "runs": runs}
    for r in runs:
        print(f"{r['endpoint']:22s} completed {r['completed']}, errored {r['errored']}, incomplete {r['incomplete']}; "
              f"{r['output_tokens_per_second']:.0f} output tokens/s; TTFT median {r['ttft_ms_median']:.1f} ms (p95 {r['ttft_ms_p95']:.1f}); "
              f"ITL median {r['itl_ms_median']:.2f} ms (p95 {r['itl_ms_p95']:.2f})")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load_generator_bench.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
