"""Sparse multi-site patching: the grid runs over the M sites, not the N rows.

Site m copies source row src[m] into row dst[m] of ``out`` (in place):

    full       out[d] = (1 - w) h + w s           (w = 1: exact copy of s)
    direction  out[d] = h + w ((s - h).u) u,  u = direction / ||direction||

Backward, per site (g = dL/dout[d]):

    full       dL/dh[d] = (1 - w) g        contribution to dL/ds[src] = w g
    direction  dL/dh[d] = g - w (g.u) u    contribution            = w (g.u) u

Contributions are written per site and then summed per source row by
``segment_sum_rows`` (deterministic when several sites read one row).
Bytes moved scale with M. Destination rows must be distinct (validated by
steerops), so programs never write the same row.
"""
import triton
import triton.language as tl

from . import config


@triton.jit
def _site_params(m, dst_ptr, src_ptr, w_ptr, ACC: tl.constexpr, HAS_W: tl.constexpr):
    d = tl.load(dst_ptr + m).to(tl.int64)
    s = tl.load(src_ptr + m).to(tl.int64)
    w = tl.full([], 1.0, ACC)
    if HAS_W:
        w = tl.load(w_ptr + m).to(ACC)
    return d, s, w


@triton.jit
def _patch_fwd_kernel(out_ptr, src_rows_ptr, dst_ptr, src_ptr, w_ptr, dir_ptr, D,
                      stride_out, stride_src, ACC: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_DIR: tl.constexpr, BLOCK_D: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    d, s, w = _site_params(m, dst_ptr, src_ptr, w_ptr, ACC, HAS_W)
    h_ptr = out_ptr + d * stride_out
    s_ptr = src_rows_ptr + s * stride_src
    cols = tl.arange(0, BLOCK_D)
    if HAS_DIR:
        # one pass for both sums ((s - h).u and u.u): nothing held across a loop
        acc = tl.zeros([], ACC)
        uu = tl.zeros([], ACC)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            cm = c < D
            h = tl.load(h_ptr + c, mask=cm, other=0.0).to(ACC)
            sv = tl.load(s_ptr + c, mask=cm, other=0.0).to(ACC)
            u = tl.load(dir_ptr + c, mask=cm, other=0.0).to(ACC)
            acc += tl.sum((sv - h) * u, 0)
            uu += tl.sum(u * u, 0)
        coef = w * acc / uu  # w ((s - h).u) / ||dir||^2
        for start in range(0, D, BLOCK_D):
            c = start + cols
            cm = c < D
            h = tl.load(h_ptr + c, mask=cm, other=0.0).to(ACC)
            out = h + coef * tl.load(dir_ptr + c, mask=cm, other=0.0).to(ACC)
            tl.store(h_ptr + c, out.to(out_ptr.dtype.element_ty), mask=cm)
    else:
        for start in range(0, D, BLOCK_D):
            c = start + cols
            cm = c < D
            sv = tl.load(s_ptr + c, mask=cm, other=0.0)
            if HAS_W:
                h = tl.load(h_ptr + c, mask=cm, other=0.0).to(ACC)
                out = (1.0 - w) * h + w * sv.to(ACC)
                tl.store(h_ptr + c, out.to(out_ptr.dtype.element_ty), mask=cm)
            else:
                tl.store(h_ptr + c, sv.to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _patch_bwd_kernel(dx_ptr, contrib_ptr, dst_ptr, src_ptr, w_ptr, dir_ptr, D,
                      stride_dx, stride_c, ACC: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_DIR: tl.constexpr, NEED_DX: tl.constexpr, NEED_DSRC: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """dx holds a copy of g; rewrites its dst rows and writes per-site contributions."""
    m = tl.program_id(0).to(tl.int64)
    d, s, w = _site_params(m, dst_ptr, src_ptr, w_ptr, ACC, HAS_W)
    g_ptr = dx_ptr + d * stride_dx
    c_ptr = contrib_ptr + m * stride_c
    cols = tl.arange(0, BLOCK_D)
    coef = tl.zeros([], ACC)
    if HAS_DIR:
        acc = tl.zeros([], ACC)
        uu = tl.zeros([], ACC)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            cm = c < D
            u = tl.load(dir_ptr + c, mask=cm, other=0.0).to(ACC)
            acc += tl.sum(tl.load(g_ptr + c, mask=cm, other=0.0).to(ACC) * u, 0)
            uu += tl.sum(u * u, 0)
        coef = w * acc / uu  # w (g.u) / ||dir||^2
    for start in range(0, D, BLOCK_D):
        c = start + cols
        cm = c < D
        g = tl.load(g_ptr + c, mask=cm, other=0.0).to(ACC)
        if HAS_DIR:
            t = coef * tl.load(dir_ptr + c, mask=cm, other=0.0).to(ACC)
            dx = g - t
        else:
            t = w * g
            dx = (1.0 - w) * g
        if NEED_DSRC:
            tl.store(c_ptr + c, t, mask=cm)
        if NEED_DX:
            tl.store(g_ptr + c, dx.to(dx_ptr.dtype.element_ty), mask=cm)


def _block(D):
    return min(triton.next_power_of_2(max(int(D), 1)), config.LOOP_BLOCK)


def patch_fwd(out, source, dst_index, src_index, *, weight=None, direction=None):
    """Patches the M sites of ``out`` (N, D) in place from ``source`` (M_src, D)."""
    M = dst_index.shape[0]
    D = out.shape[1]
    if M == 0 or D == 0:
        return out
    block = _block(D)
    _patch_fwd_kernel[(M,)](
        out, source, dst_index, src_index, out if weight is None else weight,
        out if direction is None else direction, D, out.stride(0), source.stride(0),
        ACC=config.accumulator_dtype(out.dtype), HAS_W=weight is not None,
        HAS_DIR=direction is not None, BLOCK_D=block, num_warps=config.row_warps(block))
    return out


def patch_bwd(dx, contrib, dst_index, src_index, *, weight=None, direction=None,
              need_dx=True, need_dsource=True):
    """dx (N, D) holds g on entry and dL/dhidden on exit (dst rows rewritten);
    contrib (M, D) receives the per-site source contributions."""
    M = dst_index.shape[0]
    D = dx.shape[1]
    if M == 0 or D == 0:
        return dx, contrib
    block = _block(D)
    _patch_bwd_kernel[(M,)](
        dx, dx if contrib is None else contrib, dst_index, src_index,
        dx if weight is None else weight, dx if direction is None else direction, D,
        dx.stride(0), 0 if contrib is None else contrib.stride(0),
        ACC=config.accumulator_dtype(dx.dtype), HAS_W=weight is not None,
        HAS_DIR=direction is not None, NEED_DX=need_dx, NEED_DSRC=need_dsource,
        BLOCK_D=block, num_warps=config.row_warps(block))
    return dx, contrib
