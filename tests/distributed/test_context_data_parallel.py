"""Context-parallel prefill and data-parallel decode across processes equal one process."""

from __future__ import annotations

from distributed.cp_dp_checks import cp_dp_worker
from distributed.harness import run_workers


def test_context_and_data_parallel_equal_one_process(tmp_path) -> None:
    run_workers(cp_dp_worker, 4, tmp_path, timeout_s=600)
