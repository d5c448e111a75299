"""CPU-path micro-benchmarks (pytest-benchmark). No timing assertions: in the
normal test run they execute once as correctness smoke tests; measure with

    python -m pytest tests/test_bench_cpu.py --benchmark-enable
"""
import pytest
import torch

import steerops

N, D = 2048, 1024


@pytest.fixture
def rows():
    with steerops.use_backend("torch"):
        yield torch.randn(N, D), torch.randn(N, D), torch.randn(D)


@pytest.mark.parametrize("mode", ["add", "norm_scaled", "ablate", "clamp"])
def test_bench_steer_cpu(benchmark, rows, mode):
    hidden, residual, vector = rows
    out = benchmark(steerops.steer, hidden, vector, 0.5, mode=mode, residual=residual)
    assert out.shape == hidden.shape and torch.isfinite(out).all()


def test_bench_patch_cpu(benchmark, rows):
    hidden, _, _ = rows
    source = torch.randn(N, D)
    dst = torch.randperm(N)[:256]
    out = benchmark(steerops.patch, hidden, source, dst, dst)
    assert torch.equal(out[dst], source[dst])
