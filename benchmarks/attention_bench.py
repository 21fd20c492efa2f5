"""distattn's attention against HF transformers and the machine's limits: see distattn/frontends/bench.py.

    python benchmarks/attention_bench.py [--quick] [--smoke] [--out benchmarks/results]
"""

import sys
from pathlib import Path

from distattn.frontends.bench import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(Path(__file__).parent / "results")]
    main(args)
