"""steerops: fused Triton kernels for steering and activation patching.

Public ops (see docs/ops.md): :func:`steer`, :func:`steer_`, :func:`patch`,
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

# Public names load on first use (PEP 562), so `import steerops` (and the `steerops`
# command's --help) does not pay for importing torch and transformers up front.
_PUBLIC = {
    "backend": ("get_backend", "set_backend", "unchecked", "use_backend"),
    "ops": ("intervene", "patch", "patch_", "steer", "steer_"),
    "models": ("find_layers",),
    "patching": ("PatchingResult", "patching_sweep"),
    "attribution": ("AttributionResult", "attribution_patching"),
    "caching": ("ActivationCache", "GradientCache", "cache_activations", "cache_gradients"),
    "metrics": ("logit_diff", "prob_diff"),
    "steering": ("Steering",),
    "plan": ("SweepPlan", "plan_sweep"),
    "vectors": ("SteeringVector", "learn_steering_vector"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__version__ = "0.1.0"

__all__ = ["steer", "steer_", "patch", "patch_", "intervene", "set_backend", "get_backend",
           "use_backend", "unchecked", "Steering", "SteeringVector", "learn_steering_vector",
           "cache_activations", "cache_gradients", "patching_sweep", "attribution_patching",
           "logit_diff", "prob_diff", "find_layers", "ActivationCache", "GradientCache",
           "PatchingResult", "AttributionResult", "plan_sweep", "SweepPlan"]


_SUBMODULES = ("backend", "ops", "models", "patching", "steering", "vectors", "reuse",
               "validation", "reference", "distributed", "kernels", "bench", "plan", "inputs",
               "metrics", "caching", "attribution", "sitemap", "flops", "positions", "text",
               "report", "commands", "tiny")


def __getattr__(name):
    import importlib
    if name in _SUBMODULES:  # steerops.vectors etc. without an import of their own
        return importlib.import_module(f".{name}", __name__)
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'steerops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
