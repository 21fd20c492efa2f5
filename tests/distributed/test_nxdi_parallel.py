"""NxDI model code at tp 2 (gloo on CPU) equals HF's modules."""

from __future__ import annotations

from distributed.harness import run_workers
from distributed.nxdi_checks import nxdi_tp_worker


def test_nxdi_ports_at_tp2_match_hf(tmp_path) -> None:
    """Llama, Qwen2, Qwen3, Mistral, gpt-oss, Gemma 3 and Llama 4 subclasses, sharded over 2 ranks."""
    run_workers(nxdi_tp_worker, 2, tmp_path)
