"""Scripts launched through torchrun exactly as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _launcher(script: Path) -> tuple[list[str], dict[str, str]]:
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun_bin)] if torchrun_bin.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")])}
    return command, env


def torchrun(script: Path, nproc: int, timeout: float, *args: str) -> subprocess.CompletedProcess:
    command, env = _launcher(script)
    return subprocess.run(
        [*command, "--standalone", "--nproc-per-node", str(nproc), str(script), *args],
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


def test_two_node_run_on_loopback() -> None:
    """Two torchrun launches (--nnodes 2, 2 processes each) rendezvous on 127.0.0.1: CP prefill, DP decode."""
    script = ROOT / "examples" / "context_data_parallel.py"
    command, env = _launcher(script)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [*command, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
             "--master-port", str(port), str(script), "--cp", "2", "--dp", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        for node in (0, 1)
    ]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], results
    assert "tp=4 cp=2 dp=2" in results[0][0] and "OK" in results[0][0]
