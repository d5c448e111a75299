"""Plain-PyTorch reference of every op.

Used three ways: the CPU path of the custom ops (forward and the explicit
backward below), the ground truth of the tests (the forwards are written with
differentiable torch ops, so autograd of them checks the explicit backward
formulas, and gradcheck checks them in float64), and the eager baseline of the
benchmarks.

All functions take flattened 2-D rows (N, D) and compute in float32 (float64
for float64 inputs), returning the input dtype; see docs/ops.md for the math.
"""
import torch

from . import modes


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _alpha_rows(alpha, alpha_scalar, N, cd, device):
    if alpha is None:
        return torch.full((N,), float(alpha_scalar), dtype=cd, device=device)
    return alpha.to(cd).expand(N)


def _rows_of(per_vector, vector_index):
    """Row i's entry of a (K, ...) tensor: broadcast row 0 without an index."""
    return per_vector[0] if vector_index is None else per_vector[vector_index.long()]


def _vector_rows(vector, vector_index, N, cd):
    return _rows_of(vector.to(cd), vector_index).expand(N, -1)


def _patched_input(x, residual, source, patch_src, patch_weight, cd):
    """h = hidden (+ residual), then (1 - w) h + w s on rows with patch_src >= 0."""
    h = x.to(cd)
    if residual is not None:
        h = h + residual.to(cd)
    if patch_src is None:
        return h
    sel = (patch_src >= 0).unsqueeze(-1)
    s = source.to(cd)[patch_src.long().clamp(min=0)]
    if patch_weight is None:
        return torch.where(sel, s, h)
    w = patch_weight.to(cd).unsqueeze(-1)
    return torch.where(sel, (1 - w) * h + w * s, h)


def steering_delta(h, vector, vector_index, a, mode):
    """The steering term added to each row of h (before masking).

    vector (K, D) in the compute dtype; a: (N,) tensor or a python float; mode: a
    name in ``steerops.ops.modes``. Normalises the K vectors once, then selects rows.
    """
    spec = modes.get(mode)
    a = a.unsqueeze(-1) if isinstance(a, torch.Tensor) else a
    if spec.unit:
        vector = vector / vector.norm(dim=-1, keepdim=True)
    return spec.delta(h, _rows_of(vector, vector_index), a)


def intervene_forward(x, residual=None, source=None, patch_src=None, patch_weight=None,
                      vector=None, alpha=None, alpha_scalar=1.0, mask=None, vector_index=None,
                      mode="add"):
    """residual add -> patch -> steer on rows (N, D). Differentiable."""
    cd = compute_dtype(x.dtype)
    h = _patched_input(x, residual, source, patch_src, patch_weight, cd)
    if vector is not None:
        a = float(alpha_scalar) if alpha is None else alpha.to(cd)
        delta = steering_delta(h, vector.to(cd), vector_index, a, mode)
        if mask is not None:
            delta = torch.where(mask.bool().unsqueeze(-1), delta, torch.zeros_like(delta))
        h = h + delta
    return h.to(x.dtype)


def intervene_backward(g, x, residual=None, source=None, patch_src=None, patch_weight=None,
                       vector=None, alpha=None, alpha_scalar=1.0, mask=None, vector_index=None,
                       mode="add"):
    """Explicit backward of :func:`intervene_forward` (docs/ops.md tables).

    Returns (dx, dsource, dvector, dalpha_rows); dx is also dL/dresidual,
    dsource is None without a patch, dvector/dalpha None without a vector.
    """
    N, D = x.shape
    cd = compute_dtype(x.dtype)
    g = g.to(cd)
    h = _patched_input(x, residual, source, patch_src, patch_weight, cd)
    dh = g
    dvector = dalpha = None
    if vector is not None:
        a = _alpha_rows(alpha, alpha_scalar, N, cd, x.device)
        v_rows = _vector_rows(vector, vector_index, N, cd)
        sel = torch.ones(N, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        selc = sel.to(cd).unsqueeze(-1)
        spec = modes.get(mode)
        direction = v_rows / v_rows.norm(dim=-1, keepdim=True) if spec.unit else v_rows
        dh_extra, d_rows, dalpha = spec.backward(g, h, direction, a.unsqueeze(-1))
        if dh_extra is not None:
            dh = g + selc * dh_extra
        # dL/dv per row, then summed per vector (the projection is linear in the gradient)
        d_rows = spec.vector_gradient(d_rows * selc, v_rows)
        dalpha = torch.where(sel, dalpha, torch.zeros_like(dalpha))
        K = vector.shape[0]
        index = (torch.zeros(N, dtype=torch.long, device=x.device) if vector_index is None
                 else vector_index.long())
        dvector = torch.zeros((K, D), dtype=cd, device=x.device).index_add_(0, index, d_rows)
    dx = dh
    dsource = None
    if patch_src is not None:
        patched = (patch_src >= 0).unsqueeze(-1)
        w = (torch.ones(N, 1, dtype=cd, device=x.device) if patch_weight is None
             else patch_weight.to(cd).unsqueeze(-1))
        dx = torch.where(patched, (1 - w) * dh, dh)
        contrib = torch.where(patched, w * dh, torch.zeros_like(dh))
        dsource = torch.zeros(source.shape, dtype=cd, device=x.device).index_add_(
            0, patch_src.long().clamp(min=0), contrib)
    return dx, dsource, dvector, dalpha


def patch_forward(x, source, dst_index, src_index, weight=None, direction=None, residual=None):
    """Sparse multi-site patch on rows (N, D). Differentiable."""
    cd = compute_dtype(x.dtype)
    h = x.to(cd)
    if residual is not None:
        h = h + residual.to(cd)
    dst = dst_index.long()
    hd = h[dst]
    s = source.to(cd)[src_index.long()]
    w = (torch.ones(dst.shape[0], 1, dtype=cd, device=x.device) if weight is None
         else weight.to(cd).unsqueeze(-1))
    if direction is None:
        new = s if weight is None else (1 - w) * hd + w * s
    else:
        u = direction.to(cd) / direction.to(cd).norm()
        new = hd + w * ((s - hd) @ u).unsqueeze(-1) * u
    return h.index_copy(0, dst, new).to(x.dtype)


def patch_backward(g, source_shape, dst_index, src_index, weight=None, direction=None):
    """Explicit backward of :func:`patch_forward`: (dL/dhidden, dL/dsource)."""
    cd = compute_dtype(g.dtype)
    g = g.to(cd)
    dst = dst_index.long()
    gd = g[dst]
    w = (torch.ones(dst.shape[0], 1, dtype=cd, device=g.device) if weight is None
         else weight.to(cd).unsqueeze(-1))
    if direction is None:
        new_g = (1 - w) * gd
        contrib = w * gd
    else:
        u = direction.to(cd) / direction.to(cd).norm()
        contrib = w * (gd @ u).unsqueeze(-1) * u
        new_g = gd - contrib
    dx = g.index_copy(0, dst, new_g)
    dsource = torch.zeros(source_shape, dtype=cd, device=g.device).index_add_(
        0, src_index.long(), contrib)
    return dx, dsource
