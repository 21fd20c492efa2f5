"""distattn against llama.cpp on one checkpoint, in the same run: speed (prefill, decode) and Q8_0's accuracy.

    python benchmarks/llamacpp_compare.py --llama-cpp-python VENV/bin/python --llama-cpp-src LLAMA_CPP_DIR

llama.cpp is not a dependency: point --llama-cpp-python at a Python with llama-cpp-python installed
(built without AMX where the machine cannot run it) and --llama-cpp-src at a llama.cpp source tree
(convert_hf_to_gguf.py, gguf-py/, conversion/; llama-cpp-python's sdist vendors one). The random
8-layer Llama of model_bench.py gets a small sentencepiece tokenizer (llama.cpp's converter wants
one; the ids are fed directly), is converted to an f32 GGUF and quantized to Q8_0 by llama.cpp itself.

Speed: 512-token prefill and the median one-token decode step, 2 threads on both sides, ours from
`generate`'s timers (eager and compiled decode). Accuracy: every engine's quantized model against its
own full-precision one along our fp32 model's greedy path of --steps tokens (the metrics of
docs/accuracy.md), plus llama.cpp f32 against our fp32 (the two references agree). Writes
llamacpp_compare.json. Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distattn.frontends.model_bench import MODELS, save_checkpoint  # noqa: E402
from distattn.models import DecoderLM, generate  # noqa: E402
from distattn.models.accuracy import decode_logits  # noqa: E402

WORKER = Path(__file__).with_name("llamacpp_worker.py")


def llama_cpp(python: str, **job: object) -> dict:
    """Run one llama.cpp job in the other Python; its JSON answer."""
    done = subprocess.run([python, str(WORKER), json.dumps(job)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp worker failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gguf_files(checkpoint: Path, work: Path, python: str, src: Path) -> tuple[Path, Path]:
    """(f32, Q8_0) GGUF files of `checkpoint`, converted and quantized by llama.cpp's own tools."""
    import sentencepiece as spm

    model = work / "hf"
    shutil.copytree(checkpoint, model)
    words = [f"w{i}x" for i in range(3000)]
    (work / "corpus.txt").write_text("\n".join(" ".join(words[(i * 7 + j * 13) % 3000] for j in range(12)) for i in range(3000)))
    spm.SentencePieceTrainer.train(input=str(work / "corpus.txt"), model_prefix=str(model / "tokenizer"), vocab_size=1000,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    f32, q8 = work / "f32.gguf", work / "q8_0.gguf"
    env = {"PYTHONPATH": f"{src / 'gguf-py'}:{src}", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32", "--outfile", str(f32)],
                   check=True, capture_output=True, env=env)
    llama_cpp(python, model=str(f32), quantize_to=str(q8))
    return f32, q8


def compare(reference: torch.Tensor, got: torch.Tensor) -> dict:
    """The docs' metrics: |logit error| over each step's spread (max, mean) and the top-1 share."""
    spread = (reference.amax(-1) - reference.amin(-1)).unsqueeze(-1)
    error = (got - reference).abs() / spread
    return {"max_error": float(error.max()), "mean_error": float(error.mean()), "top1": float((got.argmax(-1) == reference.argmax(-1)).double().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp-python", required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--llama-cpp-src", required=True, type=Path, help="llama.cpp sources (convert_hf_to_gguf.py, gguf-py/, conversion/)")
    parser.add_argument("--steps", type=int, default=256, help="greedy steps of the accuracy comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    report: dict = {"model": "llama-8L-1024", "threads": 2, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.cache_dir).expanduser() if args.cache_dir else Path(tmp)
        checkpoint = save_checkpoint("llama-8L-1024", root)
        f32, q8 = gguf_files(checkpoint, Path(tmp), args.llama_cpp_python, args.llama_cpp_src)
        vocab = MODELS["llama-8L-1024"]["vocab_size"]
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(3, vocab, (512,), generator=gen).tolist()
        speed = {}
        for name, path in (("llama.cpp f32", f32), ("llama.cpp Q8_0", q8)):
            speed[name] = llama_cpp(args.llama_cpp_python, model=str(path), n_ctx=1024, n_batch=512, logits=False, prompt=prompt, path=[],
                                    repeats=args.repeats, new=32)
            print(name, speed[name], flush=True)
        for quantize in (None, "int8", "int4"):
            for compiled in (False, True):
                model = DecoderLM.from_pretrained(checkpoint, quantize=quantize, pack=False)
                if compiled:
                    model.compile_decode()
                runs = [generate(model, [prompt], max_new_tokens=33, stop_tokens=[]) for _ in range(args.repeats + 1)][1:]  # first: warm-up
                name = f"distattn {quantize or 'fp32'}{' compiled' if compiled else ''}"
                speed[name] = {"prefill_ms": 1e3 * sorted(r.prefill_seconds for r in runs)[len(runs) // 2],
                               "decode_ms": 1e3 * sorted(r.decode_seconds / r.decode_steps for r in runs)[len(runs) // 2]}
                print(name, speed[name], flush=True)
        report["speed"] = speed
        # accuracy along our fp32 model's greedy path after a 32-token prompt
        short = prompt[:32]
        fp = DecoderLM.from_pretrained(checkpoint, pack=False)
        path = generate(fp, [short], max_new_tokens=args.steps, stop_tokens=[]).tokens[0]
        ours = {"fp32": decode_logits(fp, short, path)}
        for quantize in ("int8", "int4"):
            ours[quantize] = decode_logits(DecoderLM.from_pretrained(checkpoint, quantize=quantize), short, path)
        theirs = {}
        for name, file in (("f32", f32), ("Q8_0", q8)):
            out = Path(tmp) / f"{name}.npy"
            own = llama_cpp(args.llama_cpp_python, model=str(file), n_ctx=1024, n_batch=512, logits=True, prompt=short, path=path,
                            logits_out=str(out))["own"]
            import numpy as np

            theirs[name] = torch.from_numpy(np.load(out))
            differ = [i for i, (a, b) in enumerate(zip(own, path)) if a != b]
            theirs[name + " leaves"] = differ[0] if differ else None
        report["accuracy"] = {
            "llama.cpp f32 vs distattn fp32": compare(ours["fp32"], theirs["f32"]),
            "llama.cpp Q8_0 vs llama.cpp f32": {**compare(theirs["f32"], theirs["Q8_0"]), "leaves_at": theirs["Q8_0 leaves"]},
            "distattn int8 vs distattn fp32": compare(ours["fp32"], ours["int8"]),
            "distattn int4 vs distattn fp32": compare(ours["fp32"], ours["int4"]),
        }
        for name, row in report["accuracy"].items():
            print(name, row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llamacpp_compare.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
