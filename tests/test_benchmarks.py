"""The benchmark scripts run end to end (plumbing only: no time is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_attention_bench_smoke(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_bench.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "attention_bench.json").read_text())
    assert report["machine"]["matmul_gflops"] and report["machine"]["copy_gbps"] > 0
    assert [r["stage"] for r in report["results"]] == ["prefill", "decode"]
    for r in report["results"]:
        assert r["ours_ms"] > 0 and r["hf_eager_ms"] > 0 and r["roofline_ms"] > 0
    assert (tmp_path / "attention_bench.png").stat().st_size > 0


def test_paged_cache_bench_smoke(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paged_cache.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr  # it also checks paged serving == static generate
    report = json.loads((tmp_path / "paged_cache.json").read_text())
    assert [r["family"].split()[0] for r in report["results"]] == ["llama", "mistral"]
    for r in report["results"]:
        assert r["cached_prompt_tokens"] > 0 and r["static_cache_bytes"] > 0 and r["paged_peak_bytes"] > 0


def test_lora_bench_smoke(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_bench.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr  # it also checks our logits against PEFT's
    report = json.loads((tmp_path / "lora_bench.json").read_text())
    assert [r["stage"] for r in report["results"]] == ["prefill", "decode"]
    for r in report["results"]:
        assert r["ours_ms"] > 0 and r["peft_ms"] > 0 and r["ours_base_ms"] > 0 and r["peft_base_ms"] > 0


def test_model_bench_smoke(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "distattn.cli", "bench", "--model", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "model_bench_smoke.json").read_text())
    assert all(m["matmul_gflops"] > 0 and m["weight_vector_gbps"] > 0 for m in report["machine"].values())
    (case,) = report["cases"]
    assert case["tokens_equal"]  # the same greedy tokens as HF generate (fp32)
    assert case["ours_decode_ms"] > 0 and case["hf_decode_ms"] > 0 and case["decode_roofline_ms"] > 0
    assert (tmp_path / "model_bench_smoke.png").stat().st_size > 0


def test_serve_bench_smoke(tmp_path) -> None:
    pytest.importorskip("fastapi")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ours = json.loads((tmp_path / "serve_bench_smoke.json").read_text())["distattn"]
    assert ours["failures"] == 0 and ours["output_tokens"] == 4 * 4  # every request streamed its tokens (no end token in this model)
    assert ours["tokens_per_s"] > 0 and ours["ttft_p50_ms"] > 0


def test_load_bench_smoke(tmp_path) -> None:
    """Every loader runs in its own process (tp 2 under torchrun) and reports its time and peak memory."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_bench.py"), "--tiny", "--repeats", "1", "--cache-dir", str(tmp_path),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "load_bench.json").read_text())
    assert set(report["sides"]) == {"hf", "ours", "ours-plain", "ours-tp2"} and report["checkpoint_bytes"] > 0
    assert all(r["seconds"] > 0 and r["peak_added_bytes"] >= 0 and r["share_bytes"] > 0 for r in report["sides"].values())
