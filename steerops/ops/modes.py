"""The steering modes: one record per mode, read by every layer that knows modes.

A mode says what it adds to a row h given its direction and strength a, and the
gradients of that term. Modes that normalise (``unit``) see the unit vector
u = v / ||v|| and need a non-zero row; ``add`` sees the raw vector v. The record
is read by the reference (forward and explicit backward), validation (names,
zero-norm rows), the custom ops (kernel or reference, the vector-gradient
projection), ``Steering``, the CLI, the compile grid and the kernel benchmark.

Adding a mode is one ``register`` call: its forward, its backward, and, when the
Triton kernel computes it, its code in the coefficient table of kernels/steer.py.
A mode without a kernel code runs on the reference path on every device.

Math (docs/ops.md):

    add           h + a v
    norm_scaled   h + a ||h|| u     (strength relative to the token's norm)
    ablate        h - a (h.u) u     (a = 1 removes the direction)
    clamp         h + (a - h.u) u   (sets the component along u to a)
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class SteeringMode:
    """One steering mode.

    ``delta(h, d, a)``: the term added to rows h (N, D), where d is the unit
    direction rows (``unit``) or the raw vector rows, and a is (N, 1) or a float.
    ``backward(g, h, d, a)``: ``(dh_extra, dd, dalpha)`` for upstream g: the
    steering term's part of dL/dh (None when there is none), dL/dd per row, and
    dL/da per row (N,). The caller masks rows and, for unit modes, projects dL/du
    onto dL/dv (``vector_gradient``).
    """
    name: str
    math: str
    unit: bool
    delta: Callable
    backward: Callable
    kernel_code: Optional[int] = None  # the mode's row in kernels/steer.py's table

    def vector_gradient(self, du, v):
        """dL/dv from dL/dd summed per vector: d = v itself for ``add``; for unit
        modes dL/dv = (G - (G.u) u) / ||v||, linear in G so it applies to sums."""
        if not self.unit:
            return du
        vnorm = v.norm(dim=-1, keepdim=True)
        u = v / vnorm
        return (du - (du * u).sum(-1, keepdim=True) * u) / vnorm


REGISTRY = {}


def register(mode):
    """Adds a mode (its name must be new); returns it."""
    if mode.name in REGISTRY:
        raise ValueError(f"steering mode {mode.name!r} is already registered")
    REGISTRY[mode.name] = mode
    return mode


def unregister(name):
    REGISTRY.pop(name)


def names():
    """The registered mode names, in registration order."""
    return tuple(REGISTRY)


def get(name):
    """The mode called ``name``; a one-line error naming the argument otherwise."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"mode must be one of {names()}, got {name!r}")
    return REGISTRY[name]


def _dot(x, y):
    return (x * y).sum(-1, keepdim=True)


def _norm(h):
    """||h|| per row (N, 1); torch's norm has gradient 0 (not NaN) at h = 0."""
    return torch.linalg.vector_norm(h, dim=-1).unsqueeze(-1)


def _add_backward(g, h, v, a):
    return None, a * g, (g * v).sum(-1)


def _norm_scaled_backward(g, h, u, a):
    gu = _dot(g, u)
    hn = _norm(h)
    inv_hn = torch.where(hn > 0, 1 / torch.where(hn > 0, hn, torch.ones_like(hn)),
                         torch.zeros_like(hn))
    return a * gu * h * inv_hn, a * hn * g, (hn * gu).squeeze(-1)


def _ablate_backward(g, h, u, a):
    gu, hu = _dot(g, u), _dot(h, u)
    return -(a * gu * u), -a * (hu * g + gu * h), (-hu * gu).squeeze(-1)


def _clamp_backward(g, h, u, a):
    gu, hu = _dot(g, u), _dot(h, u)
    return -(gu * u), (a - hu) * g - gu * h, gu.squeeze(-1)


ADD = register(SteeringMode("add", "h + a v", False, lambda h, v, a: a * v, _add_backward, 0))
NORM_SCALED = register(SteeringMode(
    "norm_scaled", "h + a ||h|| u", True, lambda h, u, a: a * _norm(h) * u,
    _norm_scaled_backward, 1))
ABLATE = register(SteeringMode(
    "ablate", "h - a (h.u) u", True, lambda h, u, a: -a * _dot(h, u) * u, _ablate_backward, 2))
CLAMP = register(SteeringMode(
    "clamp", "h + (a - h.u) u", True, lambda h, u, a: (a - _dot(h, u)) * u, _clamp_backward, 3))
