"""Scripts launched through torchrun exactly as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def torchrun(script: Path, nproc: int, timeout: float) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [*command, "--standalone", "--nproc-per-node", str(nproc), str(script)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )


def test_tensor_parallel_example_under_torchrun() -> None:
    done = torchrun(ROOT / "examples" / "tensor_parallel.py", 2, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tp=2: max |tensor parallel - one process|" in done.stdout and "OK" in done.stdout
    assert "rank 1: q heads (4, 5, 6, 7), kv heads (1,)" in done.stdout


def test_bad_input_on_one_rank_ends_every_rank_with_its_error() -> None:
    start = time.monotonic()
    done = torchrun(ROOT / "tests" / "distributed" / "scripts" / "bad_input_on_one_rank.py", 2, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert "position_ids: position 100 is beyond the KV cache (max_seq_len=8)" in done.stderr
    assert elapsed < 60  # torchrun ends the rank left waiting in the all-reduce
