#!/usr/bin/env bash
# The checks a GPU session runs, in parts that each fit one 10-minute device call:
#
#   bash bench/gpu_session.sh tests    # the test suite on CUDA (compiled kernels) + tests/test_cuda.py
#   bash bench/gpu_session.sh bench    # kernel benchmarks, attribution timings, hook overhead
#   bash bench/gpu_session.sh lease    # one call of about 8 minutes for a 15-minute lease:
#                                      # test_cuda, the kernel tests on CUDA, bf16 forward and
#                                      # backward kernel benchmarks (quick grid, K = 1; the
#                                      # backward also with its row loop pipelined:
#                                      # steerops_pipelined), the op-call breakdown and the
#                                      # hook overhead; 7 files back
#
# The tree sent to the GPU machine has no git checkout of its own (or a stale one): give
# the commit as STEEROPS_COMMIT. Its size limit (64 MiB) is below the committed
# checkpoints' and training states': move bench/checkpoints/standard,
# bench/training_states, bench/results/attribution_v4, attribution_deep,
# attribution_multitask and compile out
# of the tree for the call (no part reads them) and back after it. That machine has no
# network, so pip cannot install the package there: links lay it out instead.
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
if ! python3 -m pip install -q --no-index -e . --no-deps --no-build-isolation >"$OUT/install.log" 2>&1; then
    # no network there, so pip may fail. setup.py maps kernels/ and bench/ into the package;
    # in this throwaway copy of the tree, links lay the same out for python -m and pytest
    ln -sfn ../kernels steerops/kernels && ln -sfn ../bench steerops/bench
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >>"$OUT/gpu.txt"
case "${1:-tests}" in
  lease)
    # one log (files back from a device call are few: 7 here); every step bounded so the
    # call ends inside its limit
    log="$OUT/session.log"
    cat "$OUT/install.log" >>"$log" 2>/dev/null; rm -f "$OUT/install.log"
    timeout 120 python3 -m pytest tests/test_cuda.py -q -p no:warnings 2>&1 | tee -a "$log"
    timeout 80 python3 -m pytest tests/test_ops.py tests/test_patch.py tests/test_custom_ops.py \
        tests/test_validation.py -q -p no:warnings -k "triton" --tb=line -rf 2>&1 \
        | grep -v "^\.*\s*\[" | tee -a "$log"
    timeout 140 python3 -m steerops bench kernels --quick --dtypes bf16 --modes fwd --K 1 \
        --out "$OUT/kernels_fwd" 2>&1 | tail -3 | tee -a "$log"
    timeout 90 python3 -m steerops bench kernels --quick --dtypes bf16 --modes bwd --ops steer \
        --K 1 --steer-modes add --out "$OUT/kernels_bwd" 2>&1 | tail -3 | tee -a "$log"
    timeout 60 python3 -m steerops bench overhead --op-call --device cuda --out /tmp/op_call \
        2>&1 | tee -a "$log"
    timeout 45 python3 -m steerops bench overhead --device cuda --hidden 2048 --layers 8 \
        --out /tmp/overhead 2>&1 | tee -a "$log"
    ;;
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
