"""The plain-PyTorch reference: gradcheck in float64, the explicit SPEC
backward formulas against autograd, and the math on hand-made cases."""
import pytest
import torch

from helpers import MODES, rand
from steerops.ops import reference as R


def _intervene_inputs(N=6, D=11, K=2, src_rows=4):
    return dict(
        x=rand(N, D, requires_grad=True), residual=rand(N, D, requires_grad=True),
        source=rand(src_rows, D, requires_grad=True),
        patch_src=torch.tensor([-1, 0, 3, 0, -1, 2])[:N], patch_weight=torch.rand(N).double(),
        vector=rand(K, D, requires_grad=True), alpha=rand(N, requires_grad=True),
        mask=torch.tensor([True, False, True, True, True, False])[:N],
        vector_index=torch.randint(0, K, (N,)))


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_intervene_reference(mode):
    kw = _intervene_inputs()
    names = ["x", "residual", "source", "vector", "alpha"]

    def f(*ts):
        args = dict(kw, **dict(zip(names, ts)))
        return R.intervene_forward(mode=mode, **args)

    assert torch.autograd.gradcheck(f, [kw[n] for n in names])


@pytest.mark.parametrize("direction", [False, True])
def test_gradcheck_patch_reference(direction):
    x, s = rand(7, 9, requires_grad=True), rand(5, 9, requires_grad=True)
    dst, src = torch.tensor([6, 0, 3]), torch.tensor([1, 1, 4])
    w = torch.rand(3).double()
    u = rand(9) if direction else None
    assert torch.autograd.gradcheck(lambda a, b: R.patch_forward(a, b, dst, src, w, u), [x, s])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("patch", [False, True])
def test_explicit_backward_matches_autograd(mode, patch):
    kw = _intervene_inputs()
    if not patch:
        kw.update(source=None, patch_src=None, patch_weight=None)
    out = R.intervene_forward(mode=mode, **kw)
    g = torch.randn_like(out)
    live = [k for k in ("x", "residual", "source", "vector", "alpha") if kw[k] is not None]
    auto = dict(zip(live, torch.autograd.grad(out, [kw[k] for k in live], g)))
    dx, dsource, dvector, dalpha = R.intervene_backward(g, mode=mode, **kw)
    torch.testing.assert_close(dx, auto["x"])
    torch.testing.assert_close(dx, auto["residual"])
    torch.testing.assert_close(dvector, auto["vector"])
    torch.testing.assert_close(dalpha, auto["alpha"])
    if patch:
        torch.testing.assert_close(dsource, auto["source"])


@pytest.mark.parametrize("direction", [False, True])
def test_explicit_patch_backward_matches_autograd(direction):
    x, s = rand(7, 9, requires_grad=True), rand(5, 9, requires_grad=True)
    dst, src = torch.tensor([6, 0, 3, 2]), torch.tensor([1, 1, 4, 1])
    w, u = torch.rand(4).double(), (rand(9) if direction else None)
    out = R.patch_forward(x, s, dst, src, w, u)
    g = torch.randn_like(out)
    ax, as_ = torch.autograd.grad(out, [x, s], g)
    dx, ds = R.patch_backward(g, s.shape, dst, src, w, u)
    torch.testing.assert_close(dx, ax)
    torch.testing.assert_close(ds, as_)


def test_modes_on_hand_made_rows():
    h = torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64)  # u = e_y, ||v|| = 2
    f = R.intervene_forward
    torch.testing.assert_close(f(h, vector=v, alpha_scalar=0.5, mode="add"),
                               torch.tensor([[3.0, 5.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(f(h, vector=v, alpha_scalar=0.2, mode="norm_scaled"),
                               torch.tensor([[3.0, 5.0, 0.0]], dtype=torch.float64))  # +0.2*5*u
    torch.testing.assert_close(f(h, vector=v, alpha_scalar=1.0, mode="ablate"),
                               torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(f(h, vector=v, alpha_scalar=-7.0, mode="clamp"),
                               torch.tensor([[3.0, -7.0, 0.0]], dtype=torch.float64))


def test_norm_scaled_zero_row_has_zero_term_and_gradient():
    h = torch.zeros(2, 5, dtype=torch.float64)
    h[1] = torch.randn(5, dtype=torch.float64)
    h.requires_grad_(True)
    v = rand(1, 5, requires_grad=True)
    out = R.intervene_forward(h, vector=v, alpha_scalar=2.0, mode="norm_scaled")
    assert torch.equal(out[0], torch.zeros(5, dtype=torch.float64))
    gh, gv = torch.autograd.grad(out[0].sum(), [h, v])
    assert torch.isfinite(gh).all() and torch.isfinite(gv).all()
    torch.testing.assert_close(gv, torch.zeros_like(gv))
    dx, _, dvec, dalpha = R.intervene_backward(torch.ones_like(h), h.detach(), vector=v.detach(),
                                               alpha_scalar=2.0, mode="norm_scaled")
    assert torch.isfinite(dx).all() and dalpha[0] == 0


def test_patch_full_weight_one_copies_exactly():
    x, s = torch.randn(5, 7), torch.randn(3, 7)
    x[2] = float("nan")  # the overwritten row's old value must not leak
    out = R.patch_forward(x, s, torch.tensor([2, 4]), torch.tensor([0, 2]))
    assert torch.equal(out[2], s[0]) and torch.equal(out[4], s[2])
    assert torch.equal(out[[0, 1, 3]], x[[0, 1, 3]])
