"""torch.library custom ops over the kernels, with fake impls and autograd.

Ops (all on flattened rows (N, D); the public functions in ``steerops.ops``
validate and reshape, then call these):

    steerops::intervene           residual add -> patch -> steer (steer = no patch)
    steerops::intervene_          the same, in place on x
    steerops::intervene_backward  its gradients
    steerops::patch / patch_      sparse multi-site patching (grid over sites)
    steerops::patch_backward      its gradients

Each implementation dispatches to the Triton kernels (CUDA, or CPU under the
forced Triton backend with the interpreter) or to ``steerops.ops.reference``.
"""
from typing import Optional

import torch
from torch import Tensor

from ..kernels import config as kconfig
from ..kernels import patch as kpatch
from ..kernels import segment_sum as kseg
from ..kernels import steer as ksteer
from ..kernels.row_inputs import RowInputs
from . import backend, modes, reference


def _mask_u8(mask):
    return None if mask is None else mask.view(torch.uint8)


def _empty(t):
    return t.new_empty((0,))


def _not_aliasing(result, t):
    """A custom op may not return (a view of) an input; the reference path can
    (identity forward, add-mode backward), so copy in that case only."""
    if result.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
        return result.clone(memory_format=torch.contiguous_format)
    return result.contiguous()


# --------------------------------------------------------------------------- intervene


def _kernel_inputs(x, residual, source, patch_src, patch_weight, vector, alpha, alpha_scalar,
                   mask, vector_index, mode):
    """The kernels' launch record, or None when the reference computes: off the
    Triton backend, or for a mode that has no row in the kernel's coefficient table."""
    code = modes.get(mode).kernel_code
    if not backend.use_triton(x) or (vector is not None and code is None):
        return None
    return RowInputs(residual=residual, source=source, patch_src=patch_src,
                     patch_weight=patch_weight, vector=vector, vector_index=vector_index,
                     alpha=alpha, alpha_scalar=alpha_scalar, mask=_mask_u8(mask),
                     mode_code=code or 0)


def intervene_impl(x, residual, source, patch_src, patch_weight, vector, alpha, alpha_scalar,
                   mask, vector_index, mode, out):
    inputs = _kernel_inputs(x, residual, source, patch_src, patch_weight, vector, alpha,
                            alpha_scalar, mask, vector_index, mode)
    if inputs is not None:
        return ksteer.steer_fwd(x, inputs, out=out)
    res = reference.intervene_forward(x, residual, source, patch_src, patch_weight, vector, alpha,
                                      alpha_scalar, mask, vector_index, mode)
    if out is None:
        return _not_aliasing(res, x)
    return out.copy_(res)


@torch.library.custom_op("steerops::intervene", mutates_args=())
def intervene_op(x: Tensor, residual: Optional[Tensor], source: Optional[Tensor],
                 patch_src: Optional[Tensor], patch_weight: Optional[Tensor],
                 vector: Optional[Tensor], alpha: Optional[Tensor], alpha_scalar: float,
                 mask: Optional[Tensor], vector_index: Optional[Tensor], steer_mode: str) -> Tensor:
    return intervene_impl(x, residual, source, patch_src, patch_weight, vector, alpha,
                          alpha_scalar, mask, vector_index, steer_mode, None)


@intervene_op.register_fake
def _(x, residual, source, patch_src, patch_weight, vector, alpha, alpha_scalar, mask,
      vector_index, steer_mode):
    return x.new_empty(x.shape)


@torch.library.custom_op("steerops::intervene_", mutates_args=("x",))
def intervene_inplace_op(x: Tensor, residual: Optional[Tensor], source: Optional[Tensor],
                         patch_src: Optional[Tensor], patch_weight: Optional[Tensor],
                         vector: Optional[Tensor], alpha: Optional[Tensor], alpha_scalar: float,
                         mask: Optional[Tensor], vector_index: Optional[Tensor],
                         steer_mode: str) -> None:
    intervene_impl(x, residual, source, patch_src, patch_weight, vector, alpha, alpha_scalar,
                   mask, vector_index, steer_mode, x)


@intervene_inplace_op.register_fake
def _(x, residual, source, patch_src, patch_weight, vector, alpha, alpha_scalar, mask,
      vector_index, steer_mode):
    return None


@torch.library.custom_op("steerops::intervene_backward", mutates_args=())
def intervene_backward_op(
        g: Tensor, x: Tensor, residual: Optional[Tensor], source: Optional[Tensor],
        patch_src: Optional[Tensor], patch_weight: Optional[Tensor], vector: Optional[Tensor],
        alpha: Optional[Tensor], alpha_scalar: float, mask: Optional[Tensor],
        vector_index: Optional[Tensor], steer_mode: str, need_dsource: bool, need_dvector: bool,
        need_dalpha: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dsource, dvector, dalpha_rows); an entry not needed is an empty tensor."""
    g = g.contiguous()
    inputs = _kernel_inputs(x, residual, source, patch_src, patch_weight, vector, alpha,
                            alpha_scalar, mask, vector_index, steer_mode)
    if inputs is not None:
        dx, dsrc_rows, part, dalpha = ksteer.steer_bwd(
            g, x, inputs, need_dsource=need_dsource, need_dvector=need_dvector)
        dsource = dvector = None
        if dsrc_rows is not None:
            dsource = dsrc_rows.new_zeros(source.shape)
            kseg.segment_sum_rows(dsrc_rows, patch_src, dsource)
        if part is not None:
            G = part.sum(0)  # second stage of the deterministic reduction
            dvector = modes.get(steer_mode).vector_gradient(G, vector.to(G.dtype))
    else:
        dx, dsource, dvector, dalpha = reference.intervene_backward(
            g, x, residual, source, patch_src, patch_weight, vector, alpha, alpha_scalar, mask,
            vector_index, steer_mode)
        dx = _not_aliasing(dx.to(x.dtype), g)
    dsource = dsource.to(source.dtype) if need_dsource and dsource is not None else _empty(x)
    dvector = dvector.to(vector.dtype) if need_dvector and dvector is not None else _empty(x)
    dalpha = dalpha.to(alpha.dtype) if need_dalpha and dalpha is not None else _empty(x)
    return dx.contiguous(), dsource, dvector, dalpha


@intervene_backward_op.register_fake
def _(g, x, residual, source, patch_src, patch_weight, vector, alpha, alpha_scalar, mask,
      vector_index, steer_mode, need_dsource, need_dvector, need_dalpha):
    return (x.new_empty(x.shape),
            source.new_empty(source.shape) if need_dsource and patch_src is not None else _empty(x),
            vector.new_empty(vector.shape) if need_dvector and vector is not None else _empty(x),
            alpha.new_empty(x.shape[:1]) if need_dalpha and vector is not None else _empty(x))


def _intervene_setup(ctx, inputs, output):
    (x, residual, source, patch_src, patch_weight, vector, alpha, alpha_scalar, mask,
     vector_index, steer_mode) = inputs
    ctx.save_for_backward(x, residual, source, patch_src, patch_weight, vector, alpha, mask,
                          vector_index)
    ctx.alpha_scalar = alpha_scalar
    ctx.mode = steer_mode


def _intervene_backward(ctx, g):
    x, residual, source, patch_src, patch_weight, vector, alpha, mask, vector_index = \
        ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dsource = bool(need[2]) and patch_src is not None
    need_dvector = bool(need[5]) and vector is not None
    need_dalpha = bool(need[6]) and vector is not None
    dx, dsource, dvector, dalpha = intervene_backward_op(
        g, x, residual, source, patch_src, patch_weight, vector, alpha, ctx.alpha_scalar, mask,
        vector_index, ctx.mode, need_dsource, need_dvector, need_dalpha)
    return (dx if need[0] else None, dx if need[1] else None,
            dsource if need_dsource else None, None, None,
            dvector if need_dvector else None, dalpha if need_dalpha else None,
            None, None, None, None)


intervene_op.register_autograd(_intervene_backward, setup_context=_intervene_setup)


# --------------------------------------------------------------------------- patch


def patch_into(out, source, dst_index, src_index, weight, direction, residual=None):
    """Patches ``out`` in place (after adding ``residual``); the body of both patch ops."""
    if residual is not None:
        out.add_(residual)
    if backend.use_triton(out):
        kpatch.patch_fwd(out, source, dst_index, src_index, weight=weight, direction=direction)
    else:
        out.copy_(reference.patch_forward(out, source, dst_index, src_index, weight, direction))
    return out


@torch.library.custom_op("steerops::patch", mutates_args=())
def patch_op(x: Tensor, source: Tensor, dst_index: Tensor, src_index: Tensor,
             weight: Optional[Tensor], direction: Optional[Tensor],
             residual: Optional[Tensor]) -> Tensor:
    return patch_into(x.clone(memory_format=torch.contiguous_format), source, dst_index,
                      src_index, weight, direction, residual)


@patch_op.register_fake
def _(x, source, dst_index, src_index, weight, direction, residual):
    return x.new_empty(x.shape)


@torch.library.custom_op("steerops::patch_", mutates_args=("x",))
def patch_inplace_op(x: Tensor, source: Tensor, dst_index: Tensor, src_index: Tensor,
                     weight: Optional[Tensor], direction: Optional[Tensor],
                     residual: Optional[Tensor]) -> None:
    patch_into(x, source, dst_index, src_index, weight, direction, residual)


@patch_inplace_op.register_fake
def _(x, source, dst_index, src_index, weight, direction, residual):
    return None


@torch.library.custom_op("steerops::patch_backward", mutates_args=())
def patch_backward_op(g: Tensor, source_rows: int, dst_index: Tensor, src_index: Tensor,
                      weight: Optional[Tensor], direction: Optional[Tensor], need_dx: bool,
                      need_dsource: bool) -> tuple[Tensor, Tensor]:
    """(dL/dhidden, dL/dsource); an entry not needed is an empty tensor."""
    D = g.shape[1]
    if backend.use_triton(g):
        acc = kconfig.torch_accumulator_dtype(g.dtype)
        dx = g.clone(memory_format=torch.contiguous_format) if need_dx else g.contiguous()
        contrib = g.new_empty((dst_index.shape[0], D), dtype=acc) if need_dsource else None
        kpatch.patch_bwd(dx, contrib, dst_index, src_index, weight=weight, direction=direction,
                         need_dx=need_dx, need_dsource=need_dsource)
        dsource = None
        if need_dsource:
            dsource = kseg.segment_sum_rows(contrib, src_index, g.new_zeros((source_rows, D),
                                                                             dtype=acc))
    else:
        dx, dsource = reference.patch_backward(g, (source_rows, D), dst_index, src_index, weight,
                                               direction)
    dx = dx.to(g.dtype) if need_dx else _empty(g)
    dsource = dsource.to(g.dtype) if need_dsource else _empty(g)
    return dx, dsource


@patch_backward_op.register_fake
def _(g, source_rows, dst_index, src_index, weight, direction, need_dx, need_dsource):
    return (g.new_empty(g.shape) if need_dx else _empty(g),
            g.new_empty((source_rows, g.shape[1])) if need_dsource else _empty(g))


def _patch_setup(ctx, inputs, output):
    x, source, dst_index, src_index, weight, direction, residual = inputs
    ctx.save_for_backward(dst_index, src_index, weight, direction)
    ctx.source_rows = source.shape[0]


def _patch_backward(ctx, g):
    dst_index, src_index, weight, direction = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx = bool(need[0] or need[6])
    need_dsource = bool(need[1])
    dx, dsource = patch_backward_op(g.contiguous(), ctx.source_rows, dst_index, src_index, weight,
                                    direction, need_dx, need_dsource)
    return (dx if need[0] else None, dsource if need_dsource else None, None, None, None, None,
            dx if need[6] else None)


patch_op.register_autograd(_patch_backward, setup_context=_patch_setup)
