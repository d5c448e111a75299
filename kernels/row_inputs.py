"""The launch record of the row kernels (kernels/steer.py): their optional inputs
grouped as one object, with the strides, pointers and constexpr flags a launch
derives from them."""
from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import config

KERNEL_MODE_CODES = (0, 1, 2, 3)  # the rows of kernels/steer.py's coefficient table


def ptr_or(t, fallback):
    """``t``, or ``fallback`` standing in for an absent tensor (a pointer the kernel's
    flags say it never reads)."""
    return fallback if t is None else t


def _check_2d(name, t):
    if t is not None and (t.dim() != 2 or t.stride(-1) != 1):
        raise ValueError(f"steerops.kernels: {name} must be 2-D with a contiguous last dim, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")


@dataclass(frozen=True)
class RowInputs:
    """The optional inputs of the row kernels, grouped as one launch record.

    All 2-D tensors need a contiguous last dim (row strides are free); 1-D
    index/weight/mask tensors are (N,); ``alpha`` is (N,) or (1,) or None (then
    ``alpha_scalar`` is used); ``mask`` is uint8; ``mode_code`` is a row of the
    coefficient table. Inputs are assumed validated (``steerops`` validates).
    """
    residual: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    patch_src: Optional[torch.Tensor] = None
    patch_weight: Optional[torch.Tensor] = None
    vector: Optional[torch.Tensor] = None
    vector_index: Optional[torch.Tensor] = None
    alpha: Optional[torch.Tensor] = None
    alpha_scalar: float = 1.0
    mask: Optional[torch.Tensor] = None
    mode_code: int = 0

    def effective(self):
        """Without a vector nothing steers: the steering inputs are moot (one
        specialization)."""
        if self.vector is None:
            return replace(self, vector_index=None, alpha=None, mask=None, mode_code=0)
        if self.mode_code not in KERNEL_MODE_CODES:
            raise ValueError(f"steerops.kernels: mode_code must be one of {KERNEL_MODE_CODES}, "
                             f"got {self.mode_code!r}")
        return self

    def check(self, *named):
        for name, t in named + (("residual", self.residual), ("source", self.source),
                                ("vector", self.vector)):
            _check_2d(name, t)

    def row_strides(self, x):
        """(residual, source, vector, alpha) row strides; 0 for an absent input."""
        def stride(t):
            return 0 if t is None else t.stride(0)
        return stride(self.residual), stride(self.source), stride(self.vector), \
            _alpha_stride(self.alpha, x.shape[0])

    def pointers(self, x):
        """The optional tensors in kernel order, x standing in for an absent one."""
        return (ptr_or(self.residual, x), ptr_or(self.source, x), ptr_or(self.patch_src, x),
                ptr_or(self.patch_weight, x), ptr_or(self.vector, x),
                ptr_or(self.vector_index, x), ptr_or(self.alpha, x), float(self.alpha_scalar),
                ptr_or(self.mask, x))

    def flags(self, x):
        """The constexpr flags that select the kernel's specialization."""
        return dict(MODE=self.mode_code, ACC=config.accumulator_dtype(x.dtype),
                    HAS_RES=self.residual is not None, HAS_PATCH=self.patch_src is not None,
                    HAS_PATCH_W=self.patch_weight is not None, HAS_STEER=self.vector is not None,
                    HAS_VIDX=self.vector_index is not None, HAS_ALPHA=self.alpha is not None,
                    HAS_MASK=self.mask is not None)


def _alpha_stride(alpha, N):
    if alpha is None:
        return 0
    if alpha.dim() != 1 or alpha.shape[0] not in (1, N):
        raise ValueError(f"steerops.kernels: alpha must have shape (1,) or ({N},)")
    return 0 if alpha.shape[0] == 1 else alpha.stride(0)
