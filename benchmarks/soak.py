"""Long soak of the property tests: many more random layers and schedules than CI runs.

    python benchmarks/soak.py [--examples 20000]

Runs tests/test_properties.py under the hypothesis "soak" profile (random, not
derandomised); a failure prints the falsifying example to reproduce.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20000)
    args = parser.parse_args()
    os.environ["HYPOTHESIS_PROFILE"] = "soak"
    os.environ["SOAK_EXAMPLES"] = str(args.examples)
    sys.exit(pytest.main([str(ROOT / "tests" / "test_properties.py"), "-q", "-p", "no:cacheprovider"]))
