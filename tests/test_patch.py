"""Sparse multi-site patching against the float64 reference, both backends."""
import pytest
import torch

import steerops
from helpers import assert_close, leaf64, rand
from steerops.ops import reference as R


def _case(dtype, N=12, D=123, M_src=6, sites=((0, 1), (5, 1), (11, 4), (3, 0), (7, 1))):
    dst = torch.tensor([d for d, _ in sites])
    src = torch.tensor([s for _, s in sites])
    return (rand(N, D, dtype=dtype, requires_grad=True),
            rand(M_src, D, dtype=dtype, requires_grad=True), dst, src)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("directional", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_patch_forward_and_grads(backend, dtype, weighted, directional, with_residual):
    hidden, source, dst, src = _case(dtype)
    M, D = dst.shape[0], hidden.shape[1]
    weight = torch.rand(M, dtype=dtype) if weighted else None
    direction = rand(D, dtype=dtype) if directional else None
    residual = rand(*hidden.shape, dtype=dtype, requires_grad=True) if with_residual else None
    out = steerops.patch(hidden, source, dst, src, weight=weight, direction=direction,
                         residual=residual)
    h64, s64 = leaf64(hidden), leaf64(source)
    r64 = None if residual is None else leaf64(residual)
    ref = R.patch_forward(h64, s64, dst, src, None if weight is None else weight.double(),
                          None if direction is None else direction.double(), r64)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    g = torch.randn_like(ref)
    live = [t for t in (hidden, source, residual) if t is not None]
    live64 = [t for t in (h64, s64, r64) if t is not None]
    for a, b in zip(torch.autograd.grad(out, live, g.to(dtype)),
                    torch.autograd.grad(ref, live64, g)):
        assert_close(a, b, dtype)


def test_patch_source_rows_shared_by_many_sites(backend, looped):
    """Several sites read one source row: its gradient is the sum, deterministic."""
    hidden, source, dst, src = _case(torch.float32, D=77)
    src = torch.tensor([2, 2, 2, 0, 2])
    w = torch.rand(5)
    outs = []
    for _ in range(2):
        out = steerops.patch(hidden, source, dst, src, weight=w)
        outs.append(torch.autograd.grad(out, source, torch.ones_like(out))[0])
    assert torch.equal(outs[0], outs[1])
    expected = torch.zeros_like(source)
    expected[2] = w[src == 2].sum()
    expected[0] = w[3]
    torch.testing.assert_close(outs[0], expected)


def test_patch_batched_3d_and_untouched_rows(backend):
    hidden = rand(2, 5, 40)
    source = rand(2, 5, 40)
    dst = torch.tensor([0, 7, 9])  # flattened (b * T + t)
    src = torch.tensor([0, 7, 4])
    out = steerops.patch(hidden, source, dst, src)
    flat_h, flat_s, flat_o = hidden.view(-1, 40), source.view(-1, 40), out.view(-1, 40)
    assert out.shape == hidden.shape
    for d, s in zip(dst.tolist(), src.tolist()):
        assert torch.equal(flat_o[d], flat_s[s])
    keep = [i for i in range(10) if i not in dst.tolist()]
    assert torch.equal(flat_o[keep], flat_h[keep])


def test_patch_no_sites_is_a_copy(backend):
    hidden, source, _, _ = _case(torch.float64)
    empty = torch.empty(0, dtype=torch.long)
    out = steerops.patch(hidden, source, empty, empty)
    assert torch.equal(out, hidden) and out.data_ptr() != hidden.data_ptr()


@pytest.mark.parametrize("directional", [False, True])
def test_patch_inplace(backend, directional):
    hidden, source, dst, src = _case(torch.float32)
    hidden, source = hidden.detach(), source.detach()
    direction = rand(hidden.shape[1], dtype=torch.float32) if directional else None
    residual = torch.randn_like(hidden)
    expected = steerops.patch(hidden, source, dst, src, direction=direction, residual=residual)
    h = hidden.clone()
    assert steerops.patch_(h, source, dst, src, direction=direction, residual=residual) is h
    torch.testing.assert_close(h, expected)


def test_patch_inplace_from_itself(backend):
    """source aliasing hidden: every site reads the pre-patch rows."""
    h = rand(6, 30)
    dst, src = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])  # a shifting chain
    expected = steerops.patch(h, h.clone(), dst, src)
    steerops.patch_(h, h, dst, src)
    assert torch.equal(h, expected)


def test_patch_direction_changes_only_that_component(backend):
    hidden, source, dst, src = _case(torch.float64)
    u = rand(hidden.shape[1])
    u = u / u.norm()
    with torch.no_grad():
        out = steerops.patch(hidden, source, dst, src, direction=u)
        delta = out[dst] - hidden[dst]
        # the change is along u, and the u-component now equals the source's
        torch.testing.assert_close(delta - (delta @ u)[:, None] * u, torch.zeros_like(delta))
        torch.testing.assert_close(out[dst] @ u, source[src] @ u)
