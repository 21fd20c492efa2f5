"""Whole-model generate against HF generate on the same checkpoint: see distattn/frontends/model_bench.py.

    python benchmarks/model_bench.py [--quick] [--smoke] [--out benchmarks/results]
"""

import sys
from pathlib import Path

from distattn.frontends.model_bench import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(Path(__file__).parent / "results")]
    main(args)
