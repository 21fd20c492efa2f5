"""The README's set-up commands and the built-in default job run as written (its examples: test_docs)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    setup = (ROOT / "README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(commands) == 2
    assert commands[1].strip() in (ROOT / ".ci" / "run").read_text()


def test_main_job_demo_runs_and_matches_hf(tmp_path) -> None:
    """The README's main job: `distattn demo` (2 processes under torchrun, parity with HF generate)."""
    done = subprocess.run([sys.executable, "-m", "distattn.cli", "demo", "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parity with HF generate: OK" in done.stdout
    assert done.stdout.count("== HF generate") == 4


@pytest.mark.parametrize("family", ["llama4", "gemma3"])
def test_demo_of_each_family_matches_hf(family: str, tmp_path) -> None:
    """`distattn demo --family ...`: chunked attention + NoPE + MoE (Llama 4), local / global layers (Gemma 3)."""
    done = subprocess.run([sys.executable, "-m", "distattn.cli", "demo", "--family", family, "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parity with HF generate: OK" in done.stdout and f"tiny random {family}" in done.stdout


def test_quickstart_job_matches_hf() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout
