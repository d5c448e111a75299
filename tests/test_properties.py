"""Property-based tests: every public op against an independent float64 ground truth
(the math of docs/ops.md written out here), forward and backward, over random shapes,
row strides, dtypes, modes and flag combinations, through the Triton kernels (the
interpreter on a CPU) and the plain-PyTorch path, single-pass and looped.

Hypothesis runs a bounded number of examples from a fixed seed (derandomize), so
CI sees the same cases every time."""
import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import steerops
from steerops.kernels import config

MODES = ("add", "norm_scaled", "ablate", "clamp")
BACKENDS = ("triton", "torch")
PROFILE = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- ground truth


def truth_steer(h, v, a, mode, mask):
    """Row-wise float64 math of docs/ops.md section 1 (h already includes the residual)."""
    u = v / v.norm(dim=-1, keepdim=True)
    if mode == "add":
        out = h + a[:, None] * v
    elif mode == "norm_scaled":
        out = h + a[:, None] * h.norm(dim=-1, keepdim=True) * u
    elif mode == "ablate":
        out = h - a[:, None] * (h * u).sum(-1, keepdim=True) * u
    else:
        out = h + (a[:, None] - (h * u).sum(-1, keepdim=True)) * u
    return out if mask is None else torch.where(mask[:, None], out, h)


def truth_patch_rows(h, s, w, direction):
    """Rows h patched from rows s with weights w (docs/ops.md section 2)."""
    if direction is None:
        return (1 - w[:, None]) * h + w[:, None] * s
    u = direction / direction.norm()
    return h + w[:, None] * ((s - h) @ u)[:, None] * u


# ----------------------------------------------------------------------------- inputs


@contextlib.contextmanager
def looped_kernels(on, bwd_row_stages=1):
    """Small limits so that the looped (multi-chunk) kernel variants run on small D;
    ``bwd_row_stages``: the backward's row-loop pipelining (kernels/config.py)."""
    names = ("MAX_SINGLE_PASS_BLOCK", "MAX_SINGLE_PASS_BLOCK_BWD", "LOOP_BLOCK", "LOOP_BLOCK_BWD",
             "BWD_ROW_STAGES")
    saved = {n: getattr(config, n) for n in names}
    config.BWD_ROW_STAGES = bwd_row_stages
    if on:
        for n, value in zip(names, (32, 32, 32, 16)):
            setattr(config, n, value)
    try:
        yield
    finally:
        for n, value in saved.items():
            setattr(config, n, value)


def strided(shape, dtype, gen, pad):
    """A tensor of ``shape`` whose rows are strided (a slice of wider storage) when
    ``pad`` > 0: the ops must read strides, not assume a layout."""
    full = torch.randn(*shape[:-1], shape[-1] + pad, dtype=dtype, generator=gen)
    return full[..., :shape[-1]]


@st.composite
def steer_cases(draw):
    lead = draw(st.sampled_from([(1,), (7,), (2, 3), (3, 1, 2)]))
    D = draw(st.sampled_from([1, 2, 17, 64, 123]))
    K = draw(st.sampled_from([1, 3]))
    return dict(lead=lead, D=D, K=K, mode=draw(st.sampled_from(MODES)),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                alpha=draw(st.sampled_from(["float", "0-d", "rows", "lead"])),
                residual=draw(st.booleans()), mask=draw(st.booleans()),
                pad=draw(st.sampled_from([0, 5])), looped=draw(st.booleans()),
                backend=draw(st.sampled_from(BACKENDS)),
                seed=draw(st.integers(0, 2**31 - 1)), bwd_row_stages=draw(st.sampled_from([1, 2])))


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)


def _steer_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    lead, D, dtype = c["lead"], c["D"], c["dtype"]
    N = int(torch.tensor(lead).prod())
    hidden = strided((*lead, D), dtype, gen, c["pad"]).requires_grad_(True)
    vector = torch.randn(c["K"], D, dtype=dtype, generator=gen) + 0.5  # never zero-norm
    vector = (vector if c["K"] > 1 else vector[0]).requires_grad_(True)
    alpha = {"float": 0.8,
             "0-d": torch.tensor(0.6, dtype=dtype),
             "rows": torch.randn(N, dtype=dtype, generator=gen),
             "lead": torch.randn(*lead, dtype=dtype, generator=gen)}[c["alpha"]]
    if isinstance(alpha, torch.Tensor):
        alpha.requires_grad_(True)
    kw = dict(mode=c["mode"])
    if c["residual"]:
        kw["residual"] = strided((*lead, D), dtype, gen, c["pad"]).requires_grad_(True)
    if c["mask"]:
        kw["mask"] = torch.rand(*lead, generator=gen) < 0.6
    if c["K"] > 1:
        kw["vector_index"] = torch.randint(0, c["K"], lead, generator=gen)
    return hidden, vector, alpha, kw, N


@given(steer_cases())
@PROFILE
def test_steer_matches_the_math_forward_and_backward(c):
    hidden, vector, alpha, kw, N = _steer_inputs(c)
    D, dtype = c["D"], c["dtype"]
    with steerops.use_backend(c["backend"]), looped_kernels(c["looped"], c["bwd_row_stages"]):
        out = steerops.steer(hidden, vector, alpha, **kw)
        g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
        leaves = [t for t in (hidden, vector, alpha, kw.get("residual"))
                  if isinstance(t, torch.Tensor)]
        grads = torch.autograd.grad(out, leaves, g)
        with torch.no_grad():  # in place: the same values
            inplace = hidden.detach().clone()
            steerops.steer_(inplace, vector.detach(), alpha.detach() if isinstance(
                alpha, torch.Tensor) else alpha, **{k: (v.detach() if isinstance(
                    v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()})
    # ground truth in float64, by autograd of the written-out math
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    by_id = {id(t): t64 for t, t64 in zip(leaves, leaves64)}
    h = by_id[id(hidden)].reshape(N, D)
    if "residual" in kw:
        h = h + by_id[id(kw["residual"])].reshape(N, D)
    v = by_id[id(vector)].reshape(-1, D)
    v_rows = v[kw["vector_index"].reshape(N)] if c["K"] > 1 else v.expand(N, D)
    a = by_id[id(alpha)] if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, dtype=torch.float64)
    a_rows = a.reshape(-1).expand(N) if a.numel() == 1 else a.reshape(N)
    mask = kw["mask"].reshape(N) if "mask" in kw else None
    want = truth_steer(h, v_rows, a_rows, c["mode"], mask).reshape(out.shape)
    want_grads = torch.autograd.grad(want, leaves64, g.double())
    assert out.dtype == dtype and out.shape == hidden.shape
    torch.testing.assert_close(out.double(), want, **_tol(dtype))
    torch.testing.assert_close(inplace.double(), want, **_tol(dtype))
    for t, got, exp in zip(leaves, grads, want_grads):
        assert got.shape == t.shape and got.dtype == t.dtype
        torch.testing.assert_close(got.double(), exp, **_tol(dtype))


@st.composite
def patch_cases(draw):
    N = draw(st.integers(1, 12))
    M = draw(st.integers(1, N))
    return dict(N=N, M=M, S=draw(st.integers(1, 9)), D=draw(st.sampled_from([1, 3, 17, 123])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                weight=draw(st.booleans()), direction=draw(st.booleans()),
                residual=draw(st.booleans()), pad=draw(st.sampled_from([0, 3])),
                backend=draw(st.sampled_from(BACKENDS)), looped=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


@given(patch_cases())
@PROFILE
def test_patch_matches_the_math_forward_and_backward(c):
    gen = torch.Generator().manual_seed(c["seed"])
    N, M, S, D, dtype = c["N"], c["M"], c["S"], c["D"], c["dtype"]
    hidden = strided((N, D), dtype, gen, c["pad"]).requires_grad_(True)
    source = strided((S, D), dtype, gen, c["pad"]).requires_grad_(True)
    dst = torch.randperm(N, generator=gen)[:M]
    src = torch.randint(0, S, (M,), generator=gen)
    kw = {}
    if c["weight"]:
        kw["weight"] = torch.rand(M, dtype=dtype, generator=gen)
    if c["direction"]:
        kw["direction"] = torch.randn(D, dtype=dtype, generator=gen) + 0.5
    if c["residual"]:
        kw["residual"] = strided((N, D), dtype, gen, c["pad"]).requires_grad_(True)
    with steerops.use_backend(c["backend"]), looped_kernels(c["looped"]):
        out = steerops.patch(hidden, source, dst, src, **kw)
        g = torch.randn(N, D, dtype=dtype, generator=torch.Generator().manual_seed(2))
        leaves = [hidden, source] + ([kw["residual"]] if "residual" in kw else [])
        grads = torch.autograd.grad(out, leaves, g)
        with torch.no_grad():
            inplace = hidden.detach().clone()
            steerops.patch_(inplace, source.detach(), dst, src,
                            **{k: v.detach() for k, v in kw.items()})
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    h = leaves64[0] + (leaves64[2] if "residual" in kw else 0)
    w = kw["weight"].double() if "weight" in kw else torch.ones(M, dtype=torch.float64)
    d = kw["direction"].double() if "direction" in kw else None
    patched = truth_patch_rows(h[dst], leaves64[1][src], w, d)
    want = h.index_put((dst,), patched)
    want_grads = torch.autograd.grad(want, leaves64, g.double())
    torch.testing.assert_close(out.double(), want, **_tol(dtype))
    torch.testing.assert_close(inplace.double(), want, **_tol(dtype))
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), exp, **_tol(dtype))


@st.composite
def intervene_cases(draw):
    c = draw(steer_cases())
    c.update(patch=draw(st.sampled_from(["none", "full", "weighted"])),
             steer=draw(st.booleans()), S=draw(st.integers(1, 6)))
    return c


@given(intervene_cases())
@PROFILE
def test_intervene_matches_the_math_forward_and_backward(c):
    if c["patch"] == "none" and not c["steer"] and not c["residual"]:
        c["steer"] = True  # an op with nothing to do is the identity; test something
    hidden, vector, alpha, kw, N = _steer_inputs(c)
    D, dtype = c["D"], c["dtype"]
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    args = {"residual": kw.get("residual")}
    leaves = [hidden] + ([kw["residual"]] if "residual" in kw else [])
    if c["patch"] != "none":
        source = torch.randn(c["S"], D, dtype=dtype, generator=gen).requires_grad_(True)
        patch_src = torch.randint(-1, c["S"], (N,), generator=gen)
        args.update(source=source, patch_src=patch_src)
        leaves.append(source)
        if c["patch"] == "weighted":
            args["patch_weight"] = torch.rand(N, dtype=dtype, generator=gen)
    if c["steer"]:
        args.update(vector=vector, alpha=alpha, mode=c["mode"], mask=kw.get("mask"),
                    vector_index=kw.get("vector_index"))
        leaves += [t for t in (vector, alpha) if isinstance(t, torch.Tensor)]
    with steerops.use_backend(c["backend"]), looped_kernels(c["looped"]):
        out = steerops.intervene(hidden, **args)
        g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    by_id = {id(t): t64 for t, t64 in zip(leaves, leaves64)}
    h = by_id[id(hidden)].reshape(N, D)
    if "residual" in kw:
        h = h + by_id[id(kw["residual"])].reshape(N, D)
    if c["patch"] != "none":
        rows = (patch_src >= 0).nonzero().flatten()
        w = (args["patch_weight"].double()[rows] if "patch_weight" in args
             else torch.ones(rows.numel(), dtype=torch.float64))
        s = by_id[id(args["source"])][patch_src[rows]]
        h = h.index_put((rows,), truth_patch_rows(h[rows], s, w, None))
    if c["steer"]:
        v = by_id[id(vector)].reshape(-1, D)
        v_rows = v[kw["vector_index"].reshape(N)] if c["K"] > 1 else v.expand(N, D)
        a = by_id[id(alpha)] if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, dtype=torch.float64)
        a_rows = a.reshape(-1).expand(N) if a.numel() == 1 else a.reshape(N)
        h = truth_steer(h, v_rows, a_rows, c["mode"],
                        kw["mask"].reshape(N) if "mask" in kw else None)
    want = h.reshape(out.shape)
    want_grads = torch.autograd.grad(want, leaves64, g.double(), allow_unused=True)
    torch.testing.assert_close(out.double(), want, **_tol(dtype))
    for t, got, exp in zip(leaves, grads, want_grads):
        if exp is None:
            exp = torch.zeros_like(t, dtype=torch.float64)
        got = torch.zeros_like(t) if got is None else got
        torch.testing.assert_close(got.double(), exp, **_tol(dtype))


def test_the_strategies_reach_every_flag():
    """The bounded example budget still covers each mode, flag and backend."""
    seen = {k: set() for k in ("mode", "alpha", "residual", "mask", "K", "looped", "backend",
                               "pad", "dtype")}

    @given(steer_cases())
    @settings(max_examples=PROFILE.max_examples, derandomize=True, database=None)
    def collect(c):
        for k in seen:
            seen[k].add(c[k])
    collect()
    assert seen["mode"] == set(MODES) and seen["backend"] == set(BACKENDS)
    assert seen["alpha"] == {"float", "0-d", "rows", "lead"}
    for k in ("residual", "mask", "looped"):
        assert seen[k] == {False, True}, k
    assert seen["K"] == {1, 3} and seen["pad"] == {0, 5} and len(seen["dtype"]) == 2


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


# ----------------------------------------------------------------------------- value checks

SPECIALS = (float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 0.5, -1e-30)


def _judged(add_check, *args):
    """True when the value check raises (its one host sync run at once)."""
    from steerops.ops import validation
    checks = validation.ValueChecks()
    checks.enabled = True
    add_check(checks, *args)
    try:
        checks.run()
    except ValueError:
        return True
    return False


@PROFILE
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       rows=st.integers(1, 4), cols=st.integers(1, 9),
       specials=st.lists(st.tuples(st.integers(0, 35), st.sampled_from(SPECIALS)), max_size=4),
       huge=st.booleans(), zero_row=st.booleans())
def test_value_checks_flag_exactly_what_elementwise_math_flags(dtype, rows, cols, specials, huge,
                                                               zero_row):
    """The checks read a few statistics (a float64 sum, row max-abs, min and max), not
    an elementwise mask: each must flag exactly what the elementwise definition does, at
    the dtype's largest finite values too."""
    from steerops.ops import validation
    gen = torch.Generator().manual_seed(rows * 100 + cols)
    t = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    if huge:  # entries at the dtype's largest finite value: their sum must stay finite
        t = t.sign() * torch.finfo(dtype).max
    t = t.to(dtype)
    if zero_row:
        t[0] = 0
    flat = t.view(-1)
    for i, value in specials:
        flat[i % flat.numel()] = value
    nonfinite = not bool(torch.isfinite(t).all())
    assert _judged(validation.check_finite, "t", t) == nonfinite
    zero = bool((t.double().abs().amax(dim=-1) == 0).any())
    assert _judged(validation.check_nonzero_rows, "t", t, "test") == zero
    w = flat.to(torch.float32)
    outside = nonfinite or bool((w < 0).any() or (w > 1).any())
    assert _judged(validation.check_unit_range, "w", w) == outside
    index = (flat.double().nan_to_num(0, 7, -7) * 3).round().long()
    low, high = -2, 3
    assert _judged(validation.check_range, "i", index, low, high, "test") == bool(
        (index < low).any() or (index >= high).any())


def test_value_checks_together_keep_indices_exact():
    """All checks of a call travel to the host in one tensor: an index's max beside a
    bfloat16 weight's must not be rounded to bfloat16 (1025 -> 1024 would pass a
    range check that must fail, and a kernel would write past the last row)."""
    from steerops.ops import validation
    for weight_dtype in (torch.bfloat16, torch.float16, torch.float32):
        checks = validation.ValueChecks()
        checks.enabled = True
        validation.check_unit_range(checks, "weight", torch.tensor([0.25, 0.5], dtype=weight_dtype))
        validation.check_range(checks, "dst_index", torch.tensor([3, 1025]), 0, 1025, "test")
        with pytest.raises(ValueError, match="dst_index out of range"):
            checks.run()
