"""The house rules, checked on the source: `mypy src` passes, no import cycle, no function over 60 lines,
few `type: ignore`s (each with its reason), nothing outside `distattn.nxdi` imports it, and
`torch.distributed` is called from `parallel/comm.py` (and `parallel/groups.py`, which builds groups) only."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "distattn"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The distattn modules `name` imports (anywhere in the file, lazy imports included)."""
    deps = set()
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = base[: len(base) - (node.level - 1)] if node.level else []
            module = ".".join(prefix + ([node.module] if node.module else []))
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target not in (name, "distattn"):
                deps.add(target)
    return deps


def test_mypy_passes() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "src"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_no_import_cycle_and_nxdi_stays_an_adapter() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    outside = sorted(n for n, deps in graph.items() if not n.startswith("distattn.nxdi") and n != "distattn"
                     and any(d.startswith("distattn.nxdi") for d in deps))
    assert not outside, f"modules outside distattn.nxdi import it: {outside}"
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_functions_fit_on_a_screen_and_ignores_say_why() -> None:
    long, ignores = [], []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
        for number, line in enumerate(source.splitlines(), 1):
            if re.search(r"#\s*type:\s*ignore", line):
                ignores.append((f"{path.relative_to(ROOT)}:{number}", line))
    assert not long, f"functions over 60 lines: {long}"
    assert len(ignores) <= 10, f"{len(ignores)} type: ignores: {[where for where, _ in ignores]}"
    unexplained = [where for where, line in ignores if not re.search(r"type:\s*ignore\[[a-z-]+\]\s+#\s*\S", line)]
    assert not unexplained, f"type: ignores without a reason after them: {unexplained}"


def test_torch_distributed_is_called_from_comm_only() -> None:
    allowed = {PACKAGE / "parallel" / "comm.py", PACKAGE / "parallel" / "groups.py"}
    callers = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                     if p not in allowed and re.search(r"^\s*(import torch\.distributed|from torch import distributed|from torch\.distributed)",
                                                        p.read_text(), re.M))
    assert not callers, f"torch.distributed used outside parallel/comm.py: {callers}"
