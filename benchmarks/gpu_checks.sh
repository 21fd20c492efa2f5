#!/usr/bin/env bash
# The CUDA checks, as one script for a GPU machine with torch and transformers installed (no install step):
# the tests marked gpu, whole-model generation against HF on the GPU (fp weights; int8 / int4 with a compiled
# decode step) and the long-context KV cache run (compiled decode). Results (JSON) go to $OUT (default
# benchmarks/results). Usage: bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1
bench() { timeout "$1" python3 -m distattn.frontends.model_bench --device cuda --repeats 2 --out "$OUT" "${@:2}" 2>&1 | grep -v "Loading weights\|Writing model"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_runner.py tests/test_module.py tests/test_paged.py tests/test_quantize.py 2>&1 | tail -4
timeout 300 python3 benchmarks/gpu_decode_bench.py --out "$OUT" 2>&1 | grep -v "Loading weights\|Writing model"
bench 100 --only llama-8L-1024 --compile --quantize int8
bench 100 --only llama-8L-1024 --compile --quantize int4
bench 120 --long-context 8192 --compile
