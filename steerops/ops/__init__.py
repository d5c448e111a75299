"""The ops over the kernels: the public ops (steer, steer_, patch, patch_, intervene;
docs/ops.md sections 1-3) here, with the steering modes, validation, the plain-PyTorch
reference, the backend switch and the custom ops beside them. Imports
``steerops.kernels`` only."""
import torch

from . import custom_ops as cops
from . import modes, validation

_STEER_DOC_MATH = """
    Per selected row, with h = hidden + residual (the add is fused),
    u = v / ||v|| and a = alpha for that row (modes: ``steerops.ops.modes``):

        mode          out
{table}
    Rows outside ``mask`` get h unchanged. Computed in fp32 (fp64 for fp64
    inputs), stored in hidden's dtype. Differentiable in hidden, residual,
    vector and alpha (deterministic reductions for vector and alpha).
""".format(table="".join(f"        {m.name:<13} {m.math}\n" for m in modes.REGISTRY.values()))


def _dispatch_directly(*tensors):
    """Eager calls that need neither autograd nor tracing skip the custom-op
    dispatcher (about 0.1 ms of Python per call, more than the op itself on
    decode-sized inputs); autograd and torch.compile go through the op."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))


def steer(hidden, vector, alpha=1.0, *, mode="add", residual=None, mask=None, vector_index=None):
    """Steer hidden states along a direction; returns a new tensor.

    Args:
        hidden: (..., D) float16/bfloat16/float32/float64.
        vector: (D,) or (K, D) steering vector(s).
        alpha: float, 0-d tensor, or a tensor of shape hidden.shape[:-1] / (N,)
            (per-row strength, e.g. an alpha sweep in one batch). May require grad.
        mode: a name in ``steerops.ops.modes``: 'add', 'norm_scaled', 'ablate', 'clamp'.
        residual: optional tensor like hidden, added first (fused).
        mask: optional bool tensor over rows (hidden.shape[:-1] or (N,)).
        vector_index: (N,) integer, row -> vector row; required when K > 1.
    """
    x, args = validation.steer_call(hidden, vector, alpha, mode, residual, mask, vector_index)
    if _dispatch_directly(hidden, vector, alpha, residual):
        return cops.intervene_impl(x, *args, None).view(hidden.shape)
    return cops.intervene_op(x, *args).view(hidden.shape)


steer.__doc__ += _STEER_DOC_MATH


def _reject_grad(name, *tensors):
    if torch.is_grad_enabled() and any(t is not None and isinstance(t, torch.Tensor)
                                       and t.requires_grad for t in tensors):
        raise RuntimeError(f"steerops.{name} works in place and does not record gradients; "
                           f"use steerops.{name.rstrip('_')} (out of place) or torch.no_grad()")


def _inplace_rows(hidden):
    """(N, D) view of hidden that shares its memory, or None when impossible."""
    D = hidden.shape[-1]
    try:
        rows = hidden.view(-1, D)
    except RuntimeError:
        return None
    return rows if rows.stride(-1) == 1 else None


def steer_(hidden, vector, alpha=1.0, *, mode="add", residual=None, mask=None, vector_index=None):
    """In-place :func:`steer`: writes the result into ``hidden`` and returns it.

    For inference hooks (no autograd): raises if grad mode is on and any input
    requires grad.
    """
    _reject_grad("steer_", hidden, vector, alpha, residual)
    x, args = validation.steer_call(hidden, vector, alpha, mode, residual, mask, vector_index)
    rows = _inplace_rows(hidden)
    direct = _dispatch_directly()
    if rows is None:  # not viewable as rows: compute out of place, copy back
        out = cops.intervene_impl(x, *args, None) if direct else cops.intervene_op(x, *args)
        hidden.copy_(out.view(hidden.shape))
    elif direct:
        cops.intervene_impl(rows, *args, rows)
    else:
        cops.intervene_inplace_op(rows, *args)
    return hidden


steer_.__doc__ += _STEER_DOC_MATH

_PATCH_DOC_MATH = """
    Site m copies source row s = src_index[m] into hidden row d = dst_index[m]
    (h = hidden + residual when residual is given; w = weight[m], default 1;
    u = direction / ||direction||):

        variant     out[d]
        full        (1 - w) h + w s
        direction   h + w ((s - h).u) u

    Rows not named in dst_index pass through. The kernel's grid runs over the
    M sites, so work scales with M, not with N. Differentiable in hidden,
    residual and source (source gradients summed deterministically when several
    sites read one row); no gradient for weight, direction or the indices.
"""


def _patch_call(hidden, source, dst_index, src_index, weight, direction, residual):
    checks = validation.ValueChecks()
    src_rows, dst, src, w, u = validation.patch_args(hidden, source, dst_index, src_index, weight,
                                            direction, residual, checks)
    checks.run()
    D = hidden.shape[-1]
    x = validation.rows_2d("hidden", hidden, D)
    res = None if residual is None else validation.rows_2d("residual", residual, D)
    return x, src_rows, dst, src, w, u, res


def patch(hidden, source, dst_index, src_index, *, weight=None, direction=None, residual=None):
    """Batched multi-site activation patching; returns a new tensor.

    Args:
        hidden: (N, D) or (B, T, D), viewed as N rows.
        source: (M_src, D) or (B_src, T, D) rows to copy from (e.g. a clean cache).
        dst_index, src_index: (M,) integer row indices, one pair per site;
            dst_index must not repeat.
        weight: optional (M,) in [0, 1] (interpolated patching).
        direction: optional (D,): patch only the component along it.
        residual: optional tensor like hidden, added first.
    """
    x, src_rows, dst, src, w, u, res = _patch_call(hidden, source, dst_index, src_index, weight,
                                                   direction, residual)
    if _dispatch_directly(hidden, source, residual):
        out = x.clone(memory_format=torch.contiguous_format)
        return cops.patch_into(out, src_rows, dst, src, w, u, res).view(hidden.shape)
    return cops.patch_op(x, src_rows, dst, src, w, u, res).view(hidden.shape)


patch.__doc__ += _PATCH_DOC_MATH


def _shares_memory(a, b):
    if torch.compiler.is_compiling():
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def patch_(hidden, source, dst_index, src_index, *, weight=None, direction=None, residual=None):
    """In-place :func:`patch` on ``hidden``; returns it. Moves only the M sites'
    rows (plus one pass for the residual add when given). No autograd."""
    _reject_grad("patch_", hidden, source, residual)
    x, src_rows, dst, src, w, u, res = _patch_call(hidden, source, dst_index, src_index, weight,
                                                   direction, residual)
    if _shares_memory(src_rows, hidden):  # sites would read rows other sites already wrote
        src_rows = src_rows.clone()
    rows = _inplace_rows(hidden)
    if rows is None:
        hidden.copy_(cops.patch_op(x, src_rows, dst, src, w, u, res).view(hidden.shape))
    elif _dispatch_directly():
        cops.patch_into(rows, src_rows, dst, src, w, u, res)
    else:
        cops.patch_inplace_op(rows, src_rows, dst, src, w, u, res)
    return hidden


patch_.__doc__ += _PATCH_DOC_MATH


def intervene(hidden, *, residual=None, source=None, patch_src=None, patch_weight=None,
              vector=None, alpha=1.0, mode="add", mask=None, vector_index=None):
    """Residual add -> patch -> steer in one read and one write of each row.

    Args:
        hidden: (..., D).
        residual: optional, like hidden; added first.
        source: rows to patch from ((M_src, D) or (..., D)); needs patch_src.
        patch_src: (N,) or hidden.shape[:-1] integer: source row for each hidden
            row, -1 for none.
        patch_weight: optional per-row weight in [0, 1] (default 1).
        vector, alpha, mode, mask, vector_index: as in :func:`steer`; steering
            is skipped when vector is None.

    Per row: h = hidden + residual; if patch_src >= 0: h = (1 - w) h + w s;
    then the steering of :func:`steer` on h. Differentiable in hidden,
    residual, source, vector and alpha.
    """
    validation.check_hidden(hidden)
    validation.check_residual(residual, hidden)
    D = hidden.shape[-1]
    N = hidden.numel() // D if D else 0
    checks = validation.ValueChecks()
    src_rows = psrc = pw = None
    if (source is None) != (patch_src is None):
        raise ValueError("source and patch_src go together: give both to patch, or neither")
    if patch_weight is not None and patch_src is None:
        raise ValueError("patch_weight needs patch_src and source")
    if patch_src is not None:
        src_rows = validation.check_source(source, hidden, D)
        validation.require_tensor("patch_src", patch_src, integer=True)
        validation.require_device("patch_src", patch_src, hidden.device)
        psrc = validation.widened(validation.per_row("patch_src", patch_src, hidden, N))
        validation.check_range(checks, "patch_src", psrc, -1, src_rows.shape[0],
                      f"-1 or a row of source, which has {src_rows.shape[0]} rows")
        if patch_weight is not None:
            validation.require_tensor("patch_weight", patch_weight, floating=True)
            validation.require_device("patch_weight", patch_weight, hidden.device)
            pw = validation.per_row("patch_weight", patch_weight.detach(), hidden, N)
            validation.check_unit_range(checks, "patch_weight", pw)
    if vector is None:
        if mask is not None or vector_index is not None:
            raise ValueError("mask and vector_index select steering rows; they need vector")
        validation.check_mode(mode)
        steer_args = (None, None, 1.0, None, None)
    else:
        steer_args = validation.steer_args(hidden, vector, alpha, mode, mask, vector_index, checks)
    checks.run()
    x = validation.rows_2d("hidden", hidden, D)
    res = None if residual is None else validation.rows_2d("residual", residual, D)
    vec, alpha_rows, alpha_scalar, m, vidx = steer_args
    args = (res, src_rows, psrc, pw, vec, alpha_rows, alpha_scalar, m, vidx, mode)
    if _dispatch_directly(hidden, residual, source, vector, alpha):
        return cops.intervene_impl(x, *args, None).view(hidden.shape)
    return cops.intervene_op(x, *args).view(hidden.shape)
