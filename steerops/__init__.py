"""steerops: fused Triton kernels for steering and activation patching.

Public ops (see SPEC.md): :func:`steer`, :func:`steer_`, :func:`patch`,
:func:`patch_`, :func:`intervene`. Hugging Face layer: :class:`Steering`,
:func:`cache_activations`, :func:`patching_sweep`, :func:`attribution_patching`,
:class:`SteeringVector`, :func:`learn_steering_vector`. Backend switches: :func:`set_backend`,
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
from .models import find_layers  # noqa: E402
from .patching import (ActivationCache, AttributionResult, GradientCache,  # noqa: E402
                       PatchingResult,
                       attribution_patching, cache_activations, cache_gradients, logit_diff,
                       patching_sweep, prob_diff)
from .steering import Steering  # noqa: E402
from .vectors import SteeringVector, learn_steering_vector  # noqa: E402

__version__ = "0.1.0"

__all__ = ["steer", "steer_", "patch", "patch_", "intervene", "set_backend", "get_backend",
           "use_backend", "unchecked", "Steering", "SteeringVector", "learn_steering_vector",
           "cache_activations", "cache_gradients", "patching_sweep", "attribution_patching",
           "logit_diff", "prob_diff", "find_layers", "ActivationCache", "GradientCache",
           "PatchingResult", "AttributionResult"]
