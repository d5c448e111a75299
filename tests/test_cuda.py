"""The kernels on a real GPU: bf16/fp16/fp32, large shapes, torch.compile and
CUDA-graph capture, against a float64 reference computed on the same device.

Runs only where CUDA is present (the GPU box: ``python -m pytest tests/test_cuda.py``);
the CPU CI covers the same kernels through the Triton interpreter.
"""
import pytest
import torch

import steerops
from steerops.ops import reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODES = ["add", "norm_scaled", "ablate", "clamp"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (rtol, atol) of a low-precision result against float64 math on the same inputs
TOL = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3), torch.float32: (1e-5, 1e-5)}
SHAPES = [(1, 4096), (4096, 4096), (1000, 5120), (77, 16384), (64, 24576), (513, 123)]


def _close(a, b, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", SHAPES)
def test_steer_cuda(mode, dtype, N, D):
    dev = "cuda"
    h = torch.randn(N, D, device=dev, dtype=dtype)
    r = torch.randn(N, D, device=dev, dtype=dtype)
    v = torch.randn(3, D, device=dev, dtype=torch.float32, requires_grad=True)
    a = torch.randn(N, device=dev, requires_grad=True)
    vi = torch.randint(0, 3, (N,), device=dev)
    mask = torch.rand(N, device=dev) > 0.2
    hl, rl = h.clone().requires_grad_(True), r.clone().requires_grad_(True)
    out = steerops.steer(hl, v, a, mode=mode, residual=rl, mask=mask, vector_index=vi)
    h64, r64 = h.double().requires_grad_(True), r.double().requires_grad_(True)
    v64, a64 = v.detach().double().requires_grad_(True), a.detach().double().requires_grad_(True)
    ref = R.intervene_forward(h64, r64, vector=v64, alpha=a64, mask=mask, vector_index=vi,
                              mode=mode)
    scale = max(1.0, ref.abs().max().item() / 8)
    _close(out, ref, dtype, scale)
    g = torch.randn(N, D, device=dev, dtype=torch.float64)
    got = torch.autograd.grad(out, [hl, rl, v, a], g.to(dtype))
    want = torch.autograd.grad(ref, [h64, r64, v64, a64], g)
    for name, x, y in zip(["hidden", "residual", "vector", "alpha"], got, want):
        # reductions over many rows: compare relative to the gradient's size
        _close(x, y, dtype, max(1.0, y.abs().max().item() / 8))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N,D", [(4096, 4096), (1000, 5120), (77, 16384), (513, 123)])
def test_pipelined_backward_cuda(mode, N, D, monkeypatch):
    """BWD_ROW_STAGES = 2 (the row loop software-pipelined, cp.async on sm_80+) computes
    the same arithmetic in the same order as the default: the same bits."""
    from steerops.kernels import config
    dev, dtype = "cuda", torch.bfloat16
    h = torch.randn(N, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(3, D, device=dev, dtype=torch.float32, requires_grad=True)
    a = torch.randn(N, device=dev, requires_grad=True)
    vi = torch.randint(0, 3, (N,), device=dev)
    g = torch.randn(N, D, device=dev, dtype=dtype)
    grads = []
    for stages in (1, 2):
        monkeypatch.setattr(config, "BWD_ROW_STAGES", stages)
        out = steerops.steer(h, v, a, mode=mode, vector_index=vi)
        grads.append(torch.autograd.grad(out, [h, v, a], g))
    for x, y in zip(*grads):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("directional", [False, True])
def test_patch_cuda(dtype, directional):
    dev, N, D, M = "cuda", 65536, 4096, 4096
    h = torch.randn(N, D, device=dev, dtype=dtype)
    s = torch.randn(N, D, device=dev, dtype=dtype, requires_grad=True)
    dst = torch.randperm(N, device=dev)[:M]
    src = torch.randint(0, N, (M,), device=dev)
    w = torch.rand(M, device=dev)
    u = torch.randn(D, device=dev) if directional else None
    out = steerops.patch(h, s, dst, src, weight=w, direction=u)
    s64 = s.detach().double().requires_grad_(True)
    ref = R.patch_forward(h.double(), s64, dst, src, w.double(),
                          None if u is None else u.double())
    _close(out, ref, dtype)
    g = torch.randn_like(ref)
    _close(torch.autograd.grad(out, s, g.to(dtype))[0], torch.autograd.grad(ref, s64, g)[0],
           dtype, 4.0)
    h2 = h.clone()
    steerops.patch_(h2, s.detach(), dst, src, weight=w, direction=u)
    torch.testing.assert_close(h2, out.detach())


@pytest.mark.parametrize("mode", MODES)
def test_intervene_cuda_bf16(mode):
    dev, N, D = "cuda", 4096, 4096
    kw = dict(residual=torch.randn(N, D, device=dev, dtype=torch.bfloat16),
              source=torch.randn(512, D, device=dev, dtype=torch.bfloat16),
              patch_src=torch.where(torch.rand(N, device=dev) > 0.5,
                                    torch.randint(0, 512, (N,), device=dev), -1),
              patch_weight=torch.rand(N, device=dev), vector=torch.randn(D, device=dev),
              alpha=0.5, mode=mode)
    h = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    out = steerops.intervene(h, **kw)
    with steerops.use_backend("torch"):
        ref = steerops.intervene(h.double(), **{k: (v.double() if isinstance(v, torch.Tensor)
                                                    and v.is_floating_point() else v)
                                                for k, v in kw.items()})
    _close(out, ref, torch.bfloat16, max(1.0, ref.abs().max().item() / 8))


def test_cuda_graph_capture_and_compile():
    dev, N, D = "cuda", 64, 4096
    h = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(D, device=dev, dtype=torch.bfloat16)
    alpha = torch.full((N,), 2.0, device=dev)
    src = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    idx = torch.arange(8, device=dev)
    expected = steerops.patch(steerops.steer(h, v, alpha, mode="norm_scaled"), src, idx, idx)
    static = h.clone()
    with steerops.unchecked():
        steerops.steer_(static, v, alpha, mode="norm_scaled")  # warm up (compile kernels)
        steerops.patch_(static, src, idx, idx)
        static.copy_(h)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            steerops.steer_(static, v, alpha, mode="norm_scaled")
            steerops.patch_(static, src, idx, idx)
    static.copy_(h)
    graph.replay()
    torch.testing.assert_close(static, expected)
    f = torch.compile(lambda x: steerops.steer(x, v, alpha, mode="norm_scaled"), fullgraph=True)
    with steerops.unchecked():
        torch.testing.assert_close(f(h), steerops.steer(h, v, alpha, mode="norm_scaled"))
