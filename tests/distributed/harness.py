"""Multi-process test harness: spawn + gloo + file rendezvous, bounded in time.

`run_workers(fn, world_size, tmp_path)` runs `fn(rank, world_size)` in each of
`world_size` fresh processes with torch.distributed initialised on gloo. A worker
that raises fails the whole run; the error lists ranks killed by a signal, then
every failed rank's exception in the order they failed, so the root cause comes
first (the others usually fail after it, in a collective). A run that outlives `timeout_s` is killed and raises
TimeoutError. Process start-up costs a few seconds,
so tests group many checks into one run.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60  # a collective waiting longer than this fails instead of hanging


def _entry(rank: int, world_size: int, init_file: str, fn: Callable[[int, int], None]) -> None:
    """One worker: init gloo, run fn, record a failure with its time for the parent (and, for a rank killed by a
    signal, where each of its threads was: faulthandler writes that to `{init_file}.rank{rank}.fault`)."""
    fault = open(f"{init_file}.rank{rank}.fault", "w")  # noqa: SIM115 (open for the life of the process)
    faulthandler.enable(file=fault, all_threads=True)
    torch.set_num_threads(1)  # 2-core machines: ranks share the cores
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        fn(rank, world_size)
    except BaseException as err:
        summary = f"rank {rank} of {world_size} failed: {type(err).__name__}: {err}"
        Path(f"{init_file}.rank{rank}.err").write_text(f"{time.time()}\n{summary}\n{traceback.format_exc()}")
        raise RuntimeError(summary) from err
    finally:
        dist.destroy_process_group()


def run_workers(fn: Callable[[int, int], None], world_size: int, tmp_path: Path, *, timeout_s: float = 300) -> None:
    """Run `fn(rank, world_size)` on `world_size` gloo processes; raise if any fails or time runs out."""
    init_file = tmp_path / f"rendezvous-{os.getpid()}-{time.monotonic_ns()}"
    context = mp.start_processes(_entry, args=(world_size, str(init_file), fn), nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{world_size}-process run did not finish in {timeout_s} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        killed = [
            f"rank {rank} of {world_size} was killed by signal {signal.Signals(-process.exitcode).name}"
            for rank, process in enumerate(context.processes)
            if process.exitcode is not None and process.exitcode < 0 and -process.exitcode != signal.SIGTERM
        ]
        reports = []
        for path in Path(tmp_path).glob(f"{init_file.name}.rank*.err"):
            when, summary, details = path.read_text().split("\n", 2)
            reports.append((float(when), summary, details))
        reports.sort()
        if not reports and not killed:
            raise
        lines = killed + [summary for _, summary, _ in reports]  # a killed rank left no report: it comes first
        details = "\n\nfirst failure:\n" + reports[0][2] if reports else ""
        for path in sorted(Path(tmp_path).glob(f"{init_file.name}.rank*.fault")):
            if path.read_text().strip():
                details += f"\n\n{path.name[len(init_file.name) + 1:]}:\n{path.read_text()}"
        raise RuntimeError("\n".join(lines) + details) from err
