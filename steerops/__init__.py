"""steerops: fused Triton kernels for steering and activation patching.

Public ops (see docs/ops.md): :func:`steer`, :func:`steer_`, :func:`patch`,
:func:`patch_`, :func:`intervene`. Hugging Face layer: :class:`Steering`,
:func:`cache_activations`, :func:`patching_sweep`, :func:`attribution_patching`,
:class:`SteeringVector`, :func:`learn_steering_vector`. Backend switches: :func:`set_backend`,
:func:`use_backend`; :func:`unchecked` skips value checks for pre-validated,
graph-captured plans.
"""
# Public names load on first use (PEP 562), so `import steerops` (and the `steerops`
# command's --help) does not pay for importing torch and transformers up front.
_PUBLIC = {
    "ops.backend": ("get_backend", "set_backend", "unchecked", "use_backend"),
    "ops": ("intervene", "patch", "patch_", "steer", "steer_"),
    "model.blocks": ("find_layers",),
    "model.caching": ("ActivationCache", "GradientCache", "cache_activations", "cache_gradients"),
    "model.metrics": ("logit_diff", "prob_diff"),
    "model.pairs": ("PromptPairs",),
    "model.steering": ("Steering",),
    "model.vectors": ("SteeringVector", "learn_steering_vector"),
    "sweeps.patching": ("PatchingResult", "patching_sweep"),
    "sweeps.attribution": ("AttributionResult", "attribution_patching"),
    "sweeps.plan": ("SweepPlan", "plan_sweep"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__version__ = "0.1.0"

__all__ = ["steer", "steer_", "patch", "patch_", "intervene", "set_backend", "get_backend",
           "use_backend", "unchecked", "Steering", "SteeringVector", "learn_steering_vector",
           "cache_activations", "cache_gradients", "patching_sweep", "attribution_patching",
           "logit_diff", "prob_diff", "find_layers", "ActivationCache", "GradientCache",
           "PatchingResult", "AttributionResult", "plan_sweep", "SweepPlan", "PromptPairs"]


# the layers, each a subpackage (imports run one way: app -> sweeps -> model -> ops ->
# kernels); steerops.kernels and steerops.bench are mapped from the repository root by
# setup.py (regular and editable installs)
_SUBMODULES = ("ops", "model", "sweeps", "app", "kernels", "bench")


def __getattr__(name):
    import importlib
    if name in _SUBMODULES:  # steerops.sweeps etc. without an import of their own
        return importlib.import_module(f".{name}", __name__)
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'steerops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
