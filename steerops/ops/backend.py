"""Backend choice and the value-check switch.

Dispatch (docs/ops.md section 5): CUDA tensors run the Triton kernels; CPU tensors
run the plain-PyTorch reference unless the Triton backend is forced, which on
CPU needs the Triton interpreter (``TRITON_INTERPRET=1`` set before import).

    STEEROPS_BACKEND=auto|triton|torch      (environment, read at import)
    steerops.set_backend("triton")          (process-wide)
    with steerops.use_backend("torch"): ... (scoped)

Value checks (index ranges, duplicate destinations, zero-norm vectors, weight
ranges) read tensor values, i.e. one host sync per call on CUDA, which CUDA
graph capture and ``torch.compile(fullgraph=True)`` cannot contain. They are on
by default; a caller that validated its plan once opts out explicitly:

    with steerops.unchecked():
        graph.replay() / compiled(...)
"""
import contextlib
import os

_BACKENDS = ("auto", "triton", "torch")
_state = {"backend": os.environ.get("STEEROPS_BACKEND", "auto"), "value_checks": True}
if _state["backend"] not in _BACKENDS:
    raise ValueError(f"STEEROPS_BACKEND must be one of {_BACKENDS}, got {_state['backend']!r}")


def get_backend():
    return _state["backend"]


def set_backend(name):
    """Select the backend: 'auto' (Triton on CUDA, PyTorch on CPU), 'triton' or 'torch'."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _state["backend"] = name


@contextlib.contextmanager
def use_backend(name):
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = old


def interpreter_active():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t):
    """Whether the op on tensor ``t`` runs the Triton kernels."""
    backend = _state["backend"]
    if backend == "torch":
        return False
    if t.device.type == "cuda":
        return True
    if backend == "triton":
        if not interpreter_active():
            raise RuntimeError(
                "steerops: the Triton backend on CPU tensors needs the Triton interpreter; "
                "set TRITON_INTERPRET=1 before importing steerops (or use backend 'auto')")
        return True
    return False


def value_checks_enabled():
    return _state["value_checks"]


@contextlib.contextmanager
def unchecked():
    """Skip the value checks that need a host sync (pre-validated plans only).

    Shape, dtype and device checks still run. Out-of-range indices passed
    under ``unchecked()`` are undefined behaviour, as in any CUDA kernel.
    """
    old = _state["value_checks"]
    _state["value_checks"] = False
    try:
        yield
    finally:
        _state["value_checks"] = old
