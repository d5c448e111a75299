#!/usr/bin/env bash
# The checks a GPU session runs, in two parts that each fit one 10-minute device call:
#
#   bash bench/gpu_session.sh tests    # the test suite on CUDA (compiled kernels) + tests/test_cuda.py
#   bash bench/gpu_session.sh bench    # kernel benchmarks, attribution timings, hook overhead
#
# Logs and results go under $OUT (default: gpu_results/). Needs no network: the
# GPU image already has torch, triton, transformers, safetensors, tqdm,
# matplotlib, pytest and pytest-benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -m pip install -q -e . --no-deps --no-build-isolation >"$OUT/install.log" 2>&1 \
    || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >>"$OUT/gpu.txt"
case "${1:-tests}" in
  tests)
    timeout 280 python3 -m pytest tests/test_cuda.py -q -p no:warnings 2>&1 | tee "$OUT/test_cuda.log"
    timeout 280 python3 -m pytest tests -q -x -p no:warnings --ignore=tests/test_cuda.py 2>&1 \
        | tee "$OUT/tests_on_cuda.log"
    ;;
  bench)
    timeout 300 python3 -m steerops bench kernels --quick --out "$OUT/kernels" 2>&1 \
        | tee "$OUT/kernels.log"
    timeout 180 python3 -m steerops bench attribution --quick --device cuda --no-progress \
        --out "$OUT/attribution" 2>&1 | tail -40 | tee "$OUT/attribution.log"
    timeout 60 python3 -m steerops bench overhead --device cuda --hidden 2048 --layers 8 \
        >"$OUT/overhead.json" 2>&1
    ;;
esac
