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
import sys as _sys


def _installed_kernels_spec():
    """The spec of a top-level ``kernels`` found on sys.path outside this checkout, or None."""
    import importlib.machinery
    import os
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in _sys.path
                 if not isinstance(p, str) or os.path.abspath(p or os.curdir) != checkout]
    return importlib.machinery.PathFinder.find_spec("kernels", elsewhere)


# Imported under the bare name "kernels": the checkout's root is on sys.path (python -m or a
# REPL started there), so this folder hides Hugging Face's `kernels` distribution, which
# transformers imports (a dependency of transformers 5.25). steerops only ever imports this
# folder as steerops.kernels, so the bare name goes to the installed package where there is
# one: the import system returns what stands in sys.modules once this file has run.
_installed = _installed_kernels_spec() if __name__ == "kernels" else None
if _installed is not None:
    import importlib.util as _util
    _module = _util.module_from_spec(_installed)
    _sys.modules["kernels"] = _module
    _installed.loader.exec_module(_module)
else:
    from .patch import patch_bwd, patch_fwd
    from .segment_sum import segment_sum_rows
    from .row_inputs import RowInputs
    from .steer import steer_bwd, steer_fwd

    __all__ = ["RowInputs", "steer_fwd", "steer_bwd", "patch_fwd", "patch_bwd",
               "segment_sum_rows"]
