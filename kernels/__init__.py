"""Triton kernels of steerops (installed as ``steerops.kernels``).

One kernel family per module, host launchers beside the kernels, no autograd:

- ``steer``: the dense row kernel (residual add -> optional patch -> steering),
  forward and backward. ``steerops.steer`` and ``steerops.intervene`` both run it;
  the patch stage is compiled out (constexpr) when unused.
- ``patch``: sparse multi-site patching whose grid runs over the M sites.
- ``segment_sum``: deterministic sum of rows grouped by a key (source-row
  gradients when several sites read the same source row).
- ``config``: block-size / warp / grid heuristics shared by the launchers.
"""
from .patch import patch_bwd, patch_fwd
from .segment_sum import segment_sum_rows
from .row_inputs import RowInputs
from .steer import steer_bwd, steer_fwd

__all__ = ["RowInputs", "steer_fwd", "steer_bwd", "patch_fwd", "patch_bwd", "segment_sum_rows"]
