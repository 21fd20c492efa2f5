import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings

# "ci": fixed examples so a run is reproducible; "soak": benchmarks/soak.py.
settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "soak", max_examples=int(os.environ.get("SOAK_EXAMPLES", "20000")), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                names[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # a zombie is gone already
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append((child, names.get(child, "")))
        todo += children.get(child, [])
    return found


def pytest_sessionfinish(session, exitstatus) -> None:
    """The suite leaves no process behind: a server, a torchrun worker or a spawned rank still alive fails the run."""
    if not os.path.isdir("/proc"):
        return
    import time

    deadline = time.time() + 10  # (processes told to stop may take a moment)
    left = [(p, c) for p, c in _descendants(os.getpid()) if "resource_tracker" not in c]
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = [(p, c) for p, c in _descendants(os.getpid()) if "resource_tracker" not in c]
    if left:
        print(f"\nprocesses the tests left running: {left}", file=sys.stderr)
        session.exitstatus = 1
