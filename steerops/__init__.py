"""steerops: fused Triton kernels for steering and activation patching.

Public ops (see SPEC.md): :func:`steer`, :func:`steer_`, :func:`patch`,
:func:`patch_`, :func:`intervene`. Backend switches: :func:`set_backend`,
:func:`use_backend`; :func:`unchecked` skips value checks for pre-validated,
graph-captured plans.
"""
import os as _os

# The kernels and benchmarks live at the repo root (kernels/, bench/) and are
# installed as steerops.kernels / steerops.bench. Running from a source tree
# without installing (PYTHONPATH=repo), resolve them from the repo root too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (package __path__)

from .backend import get_backend, set_backend, unchecked, use_backend  # noqa: E402
from .ops import intervene, patch, patch_, steer, steer_  # noqa: E402

__version__ = "0.1.0"

__all__ = ["steer", "steer_", "patch", "patch_", "intervene", "set_backend", "get_backend",
           "use_backend", "unchecked"]
