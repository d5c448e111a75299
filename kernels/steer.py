"""Dense row kernels: residual add -> optional patch -> steering, in one pass.

Per row (h = hidden + residual, then patched h = (1 - w) h + w s when the row
has a patch source), steering adds ``coef * v`` where v is the raw vector row.
The coefficient table, by ``mode_code`` (``steerops.ops.modes`` maps mode names to
these codes; a mode without a code runs on the reference path):

    0  add          coef = a                      (h + a v)
    1  norm_scaled  coef = a ||h|| / ||v||        (h + a ||h|| u)
    2  ablate       coef = -a (h.v) / ||v||^2     (h - a (h.u) u)
    3  clamp        coef = (a - h.v/||v||) / ||v|| (h + (a - h.u) u)

Working in terms of v (not u = v/||v||) lets the kernel normalise on the fly:
no separate launch to normalise the vector, and the same reductions serve all
modes. ``steerops.steer`` runs these kernels with the patch stage compiled out;
``steerops.intervene`` runs them with it compiled in.

Backward (g = dL/dout, selected rows; unselected rows pass g through):

    dL/dh   = g + c_h h + c_v v
    dL/du   = c_g g + c_hh h   (for add: dL/dv directly), summed over rows
    dL/da   = per-row scalar

The shared-vector gradient is reduced deterministically: each program owns a
slice of rows and an fp32 partial (P, K, D); the host sums the partials.
"""
import torch
import triton
import triton.language as tl

from . import config
from .row_inputs import RowInputs, ptr_or


@triton.jit
def _and_flag(block_mask, flag):
    """block_mask & scalar flag. The flag is broadcast to a block first: the
    Triton interpreter rejects a block & scalar-bool mask."""
    return block_mask & ((block_mask.to(tl.int32) * 0 + flag.to(tl.int32)) != 0)


@triton.jit
def _input_chunk(x_ptr, res_ptr, src_ptr, row, src_row, w, is_patched, cols, cmask,
                 stride_x, stride_res, stride_src, ACC: tl.constexpr, HAS_RES: tl.constexpr,
                 HAS_PATCH: tl.constexpr, HAS_PATCH_W: tl.constexpr):
    """h for one chunk of a row: hidden (+ residual), then the patch blend."""
    h = tl.load(x_ptr + row * stride_x + cols, mask=cmask, other=0.0).to(ACC)
    if HAS_RES:
        h += tl.load(res_ptr + row * stride_res + cols, mask=cmask, other=0.0).to(ACC)
    if HAS_PATCH:
        s = tl.load(src_ptr + src_row * stride_src + cols, mask=_and_flag(cmask, is_patched),
                    other=0.0).to(ACC)
        if HAS_PATCH_W:
            # (1 - w) h + w s, so that w = 1 copies s exactly
            h = tl.where(is_patched, (1.0 - w) * h + w * s, h)
        else:
            h = tl.where(is_patched, s, h)
    return h


@triton.jit
def _row_params(row, psrc_ptr, pw_ptr, vidx_ptr, alpha_ptr, alpha_scalar, stride_alpha, mask_ptr,
                ACC: tl.constexpr, HAS_PATCH: tl.constexpr, HAS_PATCH_W: tl.constexpr,
                HAS_VIDX: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_MASK: tl.constexpr):
    """Per-row scalars: patch source row / weight, vector row, alpha, mask."""
    src_row = row * 0
    is_patched = row < 0
    w = tl.zeros([], ACC)
    if HAS_PATCH:
        src_row = tl.load(psrc_ptr + row).to(tl.int64)
        is_patched = src_row >= 0
        src_row = tl.maximum(src_row, 0)
        if HAS_PATCH_W:
            w = tl.load(pw_ptr + row).to(ACC)
        else:
            w = tl.where(is_patched, 1.0, 0.0).to(ACC)
    k = row * 0
    if HAS_VIDX:
        k = tl.load(vidx_ptr + row).to(tl.int64)
    if HAS_ALPHA:
        a = tl.load(alpha_ptr + row * stride_alpha).to(ACC)
    else:
        a = tl.zeros([], ACC) + alpha_scalar  # works whether the JIT passes a scalar or a constexpr
    sel = row >= 0
    if HAS_MASK:
        sel = tl.load(mask_ptr + row) != 0
    return src_row, is_patched, w, k, a, sel


@triton.jit
def _fwd_coef(a, hh, hv, vv, MODE: tl.constexpr):
    """Steering term = coef * v (see module docstring)."""
    if MODE == 0:
        coef = a
    else:
        inv = 1.0 / tl.sqrt(vv)
        if MODE == 1:
            coef = a * tl.sqrt(hh) * inv
        elif MODE == 2:
            coef = -a * hv * inv * inv
        else:
            coef = (a - hv * inv) * inv
    return coef


@triton.jit
def _steer_fwd_kernel(
    x_ptr, res_ptr, out_ptr, src_ptr, psrc_ptr, pw_ptr,
    vec_ptr, vidx_ptr, alpha_ptr, alpha_scalar, mask_ptr,
    D, stride_x, stride_res, stride_out, stride_src, stride_vec, stride_alpha,
    MODE: tl.constexpr, ACC: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_PATCH: tl.constexpr, HAS_PATCH_W: tl.constexpr,
    HAS_STEER: tl.constexpr, HAS_VIDX: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src_row, is_patched, w, k, a, sel = _row_params(
        row, psrc_ptr, pw_ptr, vidx_ptr, alpha_ptr, alpha_scalar, stride_alpha, mask_ptr,
        ACC, HAS_PATCH, HAS_PATCH_W, HAS_VIDX, HAS_ALPHA, HAS_MASK)
    v_row_ptr = vec_ptr + k * stride_vec
    out_row_ptr = out_ptr + row * stride_out
    cols = tl.arange(0, BLOCK_D)
    if SINGLE_PASS:
        cmask = cols < D
        h = _input_chunk(x_ptr, res_ptr, src_ptr, row, src_row, w, is_patched, cols, cmask,
                         stride_x, stride_res, stride_src, ACC, HAS_RES, HAS_PATCH, HAS_PATCH_W)
        if HAS_STEER:
            v = tl.load(v_row_ptr + cols, mask=cmask, other=0.0).to(ACC)
            coef = _fwd_coef(a, tl.sum(h * h, 0), tl.sum(h * v, 0), tl.sum(v * v, 0), MODE)
            h += tl.where(sel, coef, 0.0) * v
        tl.store(out_row_ptr + cols, h.to(out_ptr.dtype.element_ty), mask=cmask)
    else:
        coef = a
        if HAS_STEER:
            if MODE != 0:
                # per-chunk sums into scalars: block-wide accumulators would hold
                # 3 x BLOCK_D extra fp32 values per program in registers
                acc_hh = tl.zeros([], ACC)
                acc_hv = tl.zeros([], ACC)
                acc_vv = tl.zeros([], ACC)
                for start in range(0, D, BLOCK_D):
                    c = start + cols
                    cmask = c < D
                    h = _input_chunk(x_ptr, res_ptr, src_ptr, row, src_row, w, is_patched, c,
                                     cmask, stride_x, stride_res, stride_src, ACC, HAS_RES,
                                     HAS_PATCH, HAS_PATCH_W)
                    v = tl.load(v_row_ptr + c, mask=cmask, other=0.0).to(ACC)
                    acc_hh += tl.sum(h * h, 0)
                    acc_hv += tl.sum(h * v, 0)
                    acc_vv += tl.sum(v * v, 0)
                coef = _fwd_coef(a, acc_hh, acc_hv, acc_vv, MODE)
            coef = tl.where(sel, coef, 0.0)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            cmask = c < D
            h = _input_chunk(x_ptr, res_ptr, src_ptr, row, src_row, w, is_patched, c, cmask,
                             stride_x, stride_res, stride_src, ACC, HAS_RES, HAS_PATCH, HAS_PATCH_W)
            if HAS_STEER:
                h += coef * tl.load(v_row_ptr + c, mask=cmask, other=0.0).to(ACC)
            tl.store(out_row_ptr + c, h.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bwd_coefs(a, gv, hv, hh, vv, sel, MODE: tl.constexpr):
    """Row scalars of the backward: dh = g + c_h h + c_v v, dvec = c_g g + c_hh h."""
    zero = tl.zeros([], a.dtype)
    c_h = zero
    c_v = zero
    c_hh = zero
    if MODE == 0:
        c_g = a
        da = gv
    else:
        inv = 1.0 / tl.sqrt(vv)
        gu = gv * inv
        hu = hv * inv
        if MODE == 1:
            hn = tl.sqrt(hh)
            # ||h|| = 0: the steering term is 0 and so is its gradient
            c_h = tl.where(hn > 0, a * gu / tl.where(hn > 0, hn, 1.0), 0.0)
            c_g = a * hn
            da = hn * gu
        elif MODE == 2:
            c_v = -a * gu * inv
            c_g = -a * hu
            c_hh = -a * gu
            da = -hu * gu
        else:
            c_v = -gu * inv
            c_g = a - hu
            c_hh = -gu
            da = gu
    c_h = tl.where(sel, c_h, 0.0)
    c_v = tl.where(sel, c_v, 0.0)
    c_g = tl.where(sel, c_g, 0.0)
    c_hh = tl.where(sel, c_hh, 0.0)
    da = tl.where(sel, da, 0.0)
    return c_h, c_v, c_g, c_hh, da


@triton.jit
def _bwd_chunk_store(g, h, v, c_h, c_v, c_g, c_hh, w, is_patched, cols, cmask, row,
                     dx_ptr, stride_dx, dsrc_ptr, stride_dsrc, part_row_ptr, acc_dv,
                     MODE: tl.constexpr, HAS_STEER: tl.constexpr, HAS_PATCH: tl.constexpr,
                     NEED_DSRC: tl.constexpr, NEED_DVEC: tl.constexpr,
                     ACC_IN_REGS: tl.constexpr):
    """Writes dL/dx (and dL/dsource row, dvec partial) for one chunk of a row."""
    dp = g
    if HAS_STEER:
        if MODE == 1:
            dp += c_h * h
        if MODE >= 2:
            dp += c_v * v
        if NEED_DVEC:
            contrib = c_g * g
            if MODE >= 2:
                contrib += c_hh * h
            if ACC_IN_REGS:
                acc_dv += contrib
            else:  # this program owns the partial row: plain read-modify-write
                prev = tl.load(part_row_ptr + cols, mask=cmask, other=0.0)
                tl.store(part_row_ptr + cols, prev + contrib, mask=cmask)
    dx = dp
    if HAS_PATCH:
        dx = tl.where(is_patched, (1.0 - w) * dp, dp)
        if NEED_DSRC:
            tl.store(dsrc_ptr + row * stride_dsrc + cols, w * dp, mask=_and_flag(cmask, is_patched))
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=cmask)
    return acc_dv


@triton.jit
def _steer_bwd_kernel(
    g_ptr, x_ptr, res_ptr, src_ptr, psrc_ptr, pw_ptr,
    vec_ptr, vidx_ptr, alpha_ptr, alpha_scalar, mask_ptr,
    dx_ptr, dsrc_ptr, part_ptr, dalpha_ptr,
    N, D, rows_per_prog,
    stride_g, stride_x, stride_res, stride_src, stride_vec, stride_alpha,
    stride_dx, stride_dsrc, stride_part_p, stride_part_k,
    MODE: tl.constexpr, ACC: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_PATCH: tl.constexpr, HAS_PATCH_W: tl.constexpr,
    HAS_STEER: tl.constexpr, HAS_VIDX: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_DSRC: tl.constexpr, NEED_DVEC: tl.constexpr,
    NEED_DALPHA: tl.constexpr, ACC_IN_REGS: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE_PASS: tl.constexpr, ROW_STAGES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    cols = tl.arange(0, BLOCK_D)
    acc_dv = tl.zeros([BLOCK_D], ACC)
    part_base = part_ptr + pid * stride_part_p
    for row in tl.range(row_start, row_end, num_stages=ROW_STAGES):
        src_row, is_patched, w, k, a, sel = _row_params(
            row, psrc_ptr, pw_ptr, vidx_ptr, alpha_ptr, alpha_scalar, stride_alpha, mask_ptr,
            ACC, HAS_PATCH, HAS_PATCH_W, HAS_VIDX, HAS_ALPHA, HAS_MASK)
        v_row_ptr = vec_ptr + k * stride_vec
        g_row_ptr = g_ptr + row * stride_g
        part_row_ptr = part_base + k * stride_part_k
        zero = tl.zeros([], ACC)
        c_h = zero
        c_v = zero
        c_g = zero
        c_hh = zero
        da = zero
        if SINGLE_PASS:
            cmask = cols < D
            g = tl.load(g_row_ptr + cols, mask=cmask, other=0.0).to(ACC)
            h = _input_chunk(x_ptr, res_ptr, src_ptr, row, src_row, w, is_patched, cols, cmask,
                             stride_x, stride_res, stride_src, ACC, HAS_RES, HAS_PATCH,
                             HAS_PATCH_W)
            v = h
            if HAS_STEER:
                v = tl.load(v_row_ptr + cols, mask=cmask, other=0.0).to(ACC)
                c_h, c_v, c_g, c_hh, da = _bwd_coefs(
                    a, tl.sum(g * v, 0), tl.sum(h * v, 0), tl.sum(h * h, 0), tl.sum(v * v, 0),
                    sel, MODE)
            acc_dv = _bwd_chunk_store(g, h, v, c_h, c_v, c_g, c_hh, w, is_patched, cols, cmask,
                                      row, dx_ptr, stride_dx, dsrc_ptr, stride_dsrc, part_row_ptr,
                                      acc_dv, MODE, HAS_STEER, HAS_PATCH, NEED_DSRC, NEED_DVEC,
                                      ACC_IN_REGS)
        else:
            if HAS_STEER:
                # per-chunk sums into scalars (see the forward): registers stay
                # with the chunk, not with four block-wide accumulators
                acc_gv = tl.zeros([], ACC)
                acc_hv = tl.zeros([], ACC)
                acc_hh = tl.zeros([], ACC)
                acc_vv = tl.zeros([], ACC)
                for start in range(0, D, BLOCK_D):
                    c = start + cols
                    cmask = c < D
                    g = tl.load(g_row_ptr + c, mask=cmask, other=0.0).to(ACC)
                    h = _input_chunk(x_ptr, res_ptr, src_ptr, row, src_row, w, is_patched, c,
                                     cmask, stride_x, stride_res, stride_src, ACC, HAS_RES,
                                     HAS_PATCH, HAS_PATCH_W)
                    v = tl.load(v_row_ptr + c, mask=cmask, other=0.0).to(ACC)
                    acc_gv += tl.sum(g * v, 0)
                    acc_hv += tl.sum(h * v, 0)
                    acc_hh += tl.sum(h * h, 0)
                    acc_vv += tl.sum(v * v, 0)
                c_h, c_v, c_g, c_hh, da = _bwd_coefs(a, acc_gv, acc_hv, acc_hh, acc_vv, sel, MODE)
            for start in range(0, D, BLOCK_D):
                c = start + cols
                cmask = c < D
                g = tl.load(g_row_ptr + c, mask=cmask, other=0.0).to(ACC)
                h = _input_chunk(x_ptr, res_ptr, src_ptr, row, src_row, w, is_patched, c, cmask,
                                 stride_x, stride_res, stride_src, ACC, HAS_RES, HAS_PATCH,
                                 HAS_PATCH_W)
                v = h
                if HAS_STEER:
                    v = tl.load(v_row_ptr + c, mask=cmask, other=0.0).to(ACC)
                acc_dv = _bwd_chunk_store(g, h, v, c_h, c_v, c_g, c_hh, w, is_patched, c, cmask,
                                          row, dx_ptr, stride_dx, dsrc_ptr, stride_dsrc,
                                          part_row_ptr, acc_dv, MODE, HAS_STEER, HAS_PATCH,
                                          NEED_DSRC, NEED_DVEC, False)
        if NEED_DALPHA:
            tl.store(dalpha_ptr + row, da)
    if ACC_IN_REGS:
        tl.store(part_base + cols, acc_dv, mask=cols < D)


def steer_fwd(x, inputs=RowInputs(), out=None):
    """Launches the fused forward; returns ``out`` ((N, D), may be ``x`` for in place)."""
    N, D = x.shape
    inputs = inputs.effective()
    inputs.check(("x", x), ("out", out))
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if N == 0 or D == 0:
        return out
    s_res, s_src, s_vec, s_alpha = inputs.row_strides(x)
    res, src, psrc, pw, vec, vidx, alpha, alpha_scalar, mask = inputs.pointers(x)
    block, single = config.row_block(D)
    warps = config.row_warps(block)
    cap = {"maxnreg": config.MAXNREG_FWD_16_WARPS} if warps == 16 else {}
    _steer_fwd_kernel[(N,)](
        x, res, out, src, psrc, pw, vec, vidx, alpha, alpha_scalar, mask,
        D, x.stride(0), s_res, out.stride(0), s_src, s_vec, s_alpha,
        **inputs.flags(x), BLOCK_D=block, SINGLE_PASS=single, num_warps=warps, **cap,
    )
    return out


def steer_bwd(g, x, inputs=RowInputs(), need_dsource=False, need_dvector=False):
    """Backward of :func:`steer_fwd`.

    Returns ``(dx, dsource_rows, dvector_partials, dalpha_rows)``:
    ``dx`` (N, D) in g's dtype, the gradient of hidden and of residual;
    ``dsource_rows`` (N, D) accumulator dtype, row i holds ``w dL/dh_i`` for
    patched rows (reduce by patch_src with :func:`segment_sum_rows`);
    ``dvector_partials`` (P, K, D) accumulator dtype, dL/du (dL/dv for add)
    partial sums per program; ``dalpha_rows`` (N,) accumulator dtype, written
    whenever alpha is a tensor (N values beside the rows' traffic of 3-4 N x D:
    one specialization fewer per flag combination). Entries not requested are None.
    """
    N, D = x.shape
    inputs = inputs.effective()
    inputs.check(("g", g), ("x", x))
    acc_torch = config.torch_accumulator_dtype(x.dtype)
    dev = x.device
    dx = torch.empty((N, D), dtype=g.dtype, device=dev)
    need_dvector = need_dvector and inputs.vector is not None
    need_dalpha = inputs.alpha is not None
    need_dsource = need_dsource and inputs.patch_src is not None
    K = 1 if inputs.vector is None else inputs.vector.shape[0]
    block, single, warps = config.backward_row_launch(D, x.device)
    acc_in_regs = single and inputs.vector_index is None
    P = config.reduction_programs(N, dev, K * D * 4 if need_dvector else 0)
    dsrc = torch.empty((N, D), dtype=acc_torch, device=dev) if need_dsource else None
    if need_dvector:
        alloc = torch.empty if acc_in_regs else torch.zeros
        part = alloc((P, K, D), dtype=acc_torch, device=dev)
    else:
        part = None
    dalpha = torch.empty((N,), dtype=acc_torch, device=dev) if need_dalpha else None
    if N == 0 or D == 0:
        if part is not None:
            part.zero_()
        return dx, dsrc, part, dalpha
    s_res, s_src, s_vec, s_alpha = inputs.row_strides(x)
    res, src, psrc, pw, vec, vidx, alpha, alpha_scalar, mask = inputs.pointers(x)
    _steer_bwd_kernel[(P,)](
        g, x, res, src, psrc, pw, vec, vidx, alpha, alpha_scalar, mask,
        dx, ptr_or(dsrc, dx), ptr_or(part, dx), ptr_or(dalpha, dx),
        N, D, triton.cdiv(N, P),
        g.stride(0), x.stride(0), s_res, s_src, s_vec, s_alpha, dx.stride(0),
        0 if dsrc is None else dsrc.stride(0),
        0 if part is None else part.stride(0), 0 if part is None else part.stride(1),
        **inputs.flags(x),
        NEED_DSRC=need_dsource, NEED_DVEC=need_dvector, NEED_DALPHA=need_dalpha,
        ACC_IN_REGS=acc_in_regs and need_dvector,
        BLOCK_D=block, SINGLE_PASS=single, ROW_STAGES=config.BWD_ROW_STAGES,
        num_warps=warps, maxnreg=config.MAXNREG_BWD,
    )
    return dx, dsrc, part, dalpha
