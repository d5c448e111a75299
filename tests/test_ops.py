"""Public ops against a float64 reference, forward and every gradient, through
the Triton kernels (interpreter) and the CPU path."""
import pytest
import torch

import steerops
from helpers import MODES, assert_close, leaf64, rand
from steerops.ops import reference as R

SHAPES = [(1, 123), (13, 123), (5, 127), (4, 1), (3, 256)]  # N, D: one row, prime, pow2


def _steer_case(N, D, K, dtype, per_row_alpha, masked, residual):
    hidden = rand(N, D, dtype=dtype, requires_grad=True)
    vector = rand(K, D, dtype=dtype, requires_grad=True) if K > 1 else rand(
        D, dtype=dtype, requires_grad=True)
    alpha = (rand(N, dtype=dtype, requires_grad=True) if per_row_alpha
             else torch.tensor(0.7, dtype=dtype, requires_grad=True))
    kw = dict(
        residual=rand(N, D, dtype=dtype, requires_grad=True) if residual else None,
        mask=(torch.arange(N) % 3 != 1) if masked else None,
        vector_index=torch.randint(0, K, (N,)) if K > 1 else None)
    return hidden, vector, alpha, kw


def _reference_steer(hidden, vector, alpha, mode, residual, mask, vector_index):
    """float64 ground truth via autograd of the reference forward."""
    h64, v64, a64 = leaf64(hidden), leaf64(vector), leaf64(alpha)
    r64 = None if residual is None else leaf64(residual)
    D = hidden.shape[-1]
    a_rows = a64.reshape(-1).expand(h64.numel() // D) if a64.numel() == 1 else a64.reshape(-1)
    out = R.intervene_forward(h64.reshape(-1, D), None if r64 is None else r64.reshape(-1, D),
                              vector=v64.reshape(-1, D), alpha=a_rows, mode=mode,
                              mask=None if mask is None else mask.reshape(-1),
                              vector_index=None if vector_index is None
                              else vector_index.reshape(-1))
    return out.view(hidden.shape), [h64, v64, a64, r64]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steer_forward_and_grads(backend, mode, N, D, dtype):
    if D == 1 and mode != "add":
        D = 2  # a 1-wide normalised direction is degenerate but allowed; keep it meaningful
    hidden, vector, alpha, kw = _steer_case(N, D, 3, dtype, True, True, True)
    out = steerops.steer(hidden, vector, alpha, mode=mode, **kw)
    ref, ref_inputs = _reference_steer(hidden, vector, alpha, mode, **kw)
    assert out.dtype == dtype and out.shape == hidden.shape
    assert_close(out, ref, dtype)
    g = torch.randn_like(ref)
    inputs = [hidden, vector, alpha, kw["residual"]]
    got = torch.autograd.grad(out, inputs, g.to(dtype))
    want = torch.autograd.grad(ref, ref_inputs, g)
    for name, a, b in zip(["hidden", "vector", "alpha", "residual"], got, want):
        assert a.dtype == dtype
        assert_close(a, b, dtype, msg=f"grad {name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["scalar_float", "scalar_tensor", "single_vector",
                                     "no_mask", "batched_3d"])
def test_steer_argument_variants(backend, mode, variant):
    dtype = torch.float64
    N, D = 6, 37
    hidden, vector, alpha, kw = _steer_case(N, D, 1, dtype, False, variant != "no_mask", False)
    if variant == "scalar_float":
        alpha = -1.25
    if variant == "batched_3d":  # (B, T, D) with a (B, T) mask and per-(B, T) alpha
        hidden = rand(2, 3, D, requires_grad=True)
        alpha = rand(2, 3, requires_grad=True)
        kw["mask"] = torch.tensor([[True, False, True], [True, True, False]])
    out = steerops.steer(hidden, vector, alpha, mode=mode, **kw)
    a = torch.tensor(alpha, dtype=dtype) if isinstance(alpha, float) else alpha
    ref, ref_inputs = _reference_steer(hidden, vector, a, mode, **kw)
    assert_close(out, ref, dtype)
    live = [t for t in (hidden, vector, alpha) if isinstance(t, torch.Tensor)]
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, live, g)
    want = torch.autograd.grad(ref, ref_inputs[:len(live)], g)
    for x, y in zip(got, want):
        assert_close(x, y, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_steer_looped_variant(backend, looped, mode):
    """D wider than the block: the two-pass looped kernel (and D = 3000)."""
    for N, D, K in [(7, 123, 3), (2, 3000, 1)]:
        hidden, vector, alpha, kw = _steer_case(N, D, K, torch.float64, True, True, True)
        out = steerops.steer(hidden, vector, alpha, mode=mode, **kw)
        ref, ref_inputs = _reference_steer(hidden, vector, alpha, mode, **kw)
        assert_close(out, ref, torch.float64)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, [hidden, vector, alpha, kw["residual"]], g)
        want = torch.autograd.grad(ref, ref_inputs, g)
        for x, y in zip(got, want):
            assert_close(x, y, torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_steer_inplace_matches_out_of_place(backend, mode):
    hidden, vector, alpha, kw = _steer_case(9, 50, 2, torch.float32, True, True, True)
    with torch.no_grad():
        expected = steerops.steer(hidden, vector, alpha, mode=mode, **kw)
        h = hidden.detach().clone()
        ret = steerops.steer_(h, vector, alpha, mode=mode, **kw)
    assert ret is h
    torch.testing.assert_close(h, expected)
    # a non-contiguous hidden (no (N, D) view): still written in place, correctly
    base = torch.randn(50, 9).t()
    with torch.no_grad():
        want = steerops.steer(base.clone(), vector, alpha, mode=mode, **kw)
        steerops.steer_(base, vector, alpha, mode=mode, **kw)
    torch.testing.assert_close(base, want)


def test_steer_mask_leaves_rows_unchanged(backend):
    hidden, residual = rand(8, 31), rand(8, 31)
    mask = torch.tensor([True, False] * 4)
    out = steerops.steer(hidden, rand(31), 3.0, mode="norm_scaled", residual=residual, mask=mask)
    assert torch.equal(out[~mask], (hidden + residual)[~mask])
    assert not torch.allclose(out[mask], (hidden + residual)[mask])


def test_alpha_sweep_in_one_batch(backend):
    """Per-row alpha = one forward for a whole sweep: row i equals a scalar call."""
    h = rand(1, 40).expand(5, 40).contiguous()
    v = rand(40)
    alphas = torch.linspace(-2, 2, 5, dtype=torch.float64)
    out = steerops.steer(h, v, alphas, mode="clamp")
    for i, a in enumerate(alphas.tolist()):
        assert_close(out[i], steerops.steer(h[i:i + 1], v, a, mode="clamp")[0], torch.float64)


def _intervene_case(dtype, N=10, D=45, K=2):
    return dict(
        hidden=rand(N, D, dtype=dtype, requires_grad=True),
        residual=rand(N, D, dtype=dtype, requires_grad=True),
        source=rand(4, D, dtype=dtype, requires_grad=True),
        patch_src=torch.tensor([-1, 0, 3, 0, -1, 2, 0, -1, 1, 3])[:N],
        patch_weight=torch.rand(N, dtype=dtype),
        vector=rand(K, D, dtype=dtype, requires_grad=True),
        alpha=rand(N, dtype=dtype, requires_grad=True),
        mask=torch.arange(N) % 4 != 2, vector_index=torch.randint(0, K, (N,)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [True, False])
def test_intervene_forward_and_grads(backend, mode, dtype, weighted):
    kw = _intervene_case(dtype)
    if not weighted:
        kw["patch_weight"] = None
    out = steerops.intervene(mode=mode, **kw)
    names = ["hidden", "residual", "source", "vector", "alpha"]
    leaves64 = {n: leaf64(kw[n]) for n in names}
    ref = R.intervene_forward(
        leaves64["hidden"], leaves64["residual"], leaves64["source"], kw["patch_src"],
        None if kw["patch_weight"] is None else kw["patch_weight"].double(),
        leaves64["vector"], leaves64["alpha"], 1.0, kw["mask"], kw["vector_index"], mode)
    assert_close(out, ref, dtype)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [kw[n] for n in names], g.to(dtype))
    want = torch.autograd.grad(ref, [leaves64[n] for n in names], g)
    for name, a, b in zip(names, got, want):
        assert_close(a, b, dtype, msg=f"grad {name}")


@pytest.mark.parametrize("mode", MODES)
def test_intervene_looped_variant(backend, looped, mode):
    kw = _intervene_case(torch.float64, D=77)
    out = steerops.intervene(mode=mode, **kw)
    with steerops.use_backend("torch"):
        ref = steerops.intervene(mode=mode, **kw)
    assert_close(out, ref, torch.float64)
    g = torch.randn_like(ref)
    leaves = [kw[n] for n in ("hidden", "residual", "source", "vector", "alpha")]
    got = torch.autograd.grad(out, leaves, g)
    with steerops.use_backend("torch"):
        want = torch.autograd.grad(steerops.intervene(mode=mode, **kw), leaves, g)
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64)


def test_intervene_pieces_equal_separate_ops(backend):
    """intervene = residual add, then patch, then steer (SPEC section 3)."""
    kw = _intervene_case(torch.float64)
    with torch.no_grad():
        fused = steerops.intervene(mode="ablate", **kw)
        rows = torch.nonzero(kw["patch_src"] >= 0).flatten()
        patched = steerops.patch(kw["hidden"], kw["source"], rows, kw["patch_src"][rows],
                                 weight=kw["patch_weight"][rows], residual=kw["residual"])
        staged = steerops.steer(patched, kw["vector"], kw["alpha"], mode="ablate",
                                mask=kw["mask"], vector_index=kw["vector_index"])
    assert_close(fused, staged, torch.float64)


def test_intervene_patch_only_and_identity(backend):
    h, s = rand(6, 20), rand(3, 20)
    ps = torch.tensor([2, -1, -1, 0, -1, 1])
    out = steerops.intervene(h, source=s, patch_src=ps)
    assert torch.equal(out[0], s[2]) and torch.equal(out[3], s[0]) and torch.equal(out[1], h[1])
    same = steerops.intervene(h)
    assert torch.equal(same, h) and same.data_ptr() != h.data_ptr()


def test_vector_gradient_is_deterministic(backend):
    hidden, vector, alpha, kw = _steer_case(33, 70, 3, torch.float32, True, True, True)
    results = []
    for _ in range(2):
        out = steerops.steer(hidden, vector, alpha, mode="norm_scaled", **kw)
        results.append(torch.autograd.grad(out.square().sum(), [vector, alpha]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("looped_rows", [False, True])
def test_pipelined_backward_gives_the_same_gradients(backend, looped_rows, monkeypatch):
    """kernels/config.py BWD_ROW_STAGES = 2 pipelines the backward's row loop (the next
    row's loads issued while the current one reduces): the same arithmetic in the same
    order, so the same bits as the default."""
    from steerops.kernels import config
    if looped_rows:
        monkeypatch.setattr(config, "MAX_SINGLE_PASS_BLOCK_BWD", 32)
        monkeypatch.setattr(config, "LOOP_BLOCK_BWD", 16)
    hidden, vector, alpha, kw = _steer_case(29, 123, 3, torch.float32, True, True, True)
    leaves = [hidden, vector, alpha, kw["residual"]]
    g = rand(*hidden.shape)
    results = []
    for stages in (1, 2):
        monkeypatch.setattr(config, "BWD_ROW_STAGES", stages)
        out = steerops.steer(hidden, vector, alpha, mode="norm_scaled", **kw)
        results.append(torch.autograd.grad(out, leaves, g))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    want, leaves64 = _reference_steer(hidden, vector, alpha, "norm_scaled", **kw)
    for got, exp in zip(results[1], torch.autograd.grad(want, leaves64, g.double())):
        assert_close(got, exp, torch.float32)
