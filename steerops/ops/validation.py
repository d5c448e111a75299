"""Argument validation for the public ops (docs/ops.md section 4).

Every check runs before any kernel launch. Static checks (types, shapes,
dtypes, devices, mode) always run. Value checks are gathered and evaluated
with a single host sync per call; ``steerops.unchecked()`` skips them.
"""
import math
import numbers

import torch

from . import backend, modes
from .reference import compute_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _is_tracing():
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class ValueChecks:
    """Deferred checks on tensor values, evaluated with one host sync.

    Each check leaves a few numbers on the device: a flag (``add``) or statistics that
    a host predicate judges (``add_stats``: a range check's min and max, a float64 sum
    that is finite exactly when every entry is). Few small kernels per check, then
    one copy of them all to the host: on a GPU each kernel launch costs host time, and
    a validated call's checks cost more than its kernel (docs/ops.md section 4)."""

    def __init__(self):
        self._items = []
        self.enabled = backend.value_checks_enabled()

    def add(self, bad, exc_type, message):
        """``bad``: callable giving a 0-d bool tensor (not evaluated when checks are off);
        ``message``: str or callable giving one."""
        if self.enabled:
            self._items.append((bad(), None, exc_type, message))

    def add_stats(self, stats, bad, exc_type, message):
        """``stats``: callable giving a small tensor (or a tuple of them) of numbers on the
        device; ``bad``: predicate on their host values (one list, in order), true when
        the input is bad."""
        if self.enabled:
            self._items.append((stats(), bad, exc_type, message))

    def run(self):
        if not self._items:
            return
        if _is_tracing():
            raise RuntimeError(
                "steerops: value checks (index ranges, norms, weights) need a host sync and "
                "cannot run inside torch.compile or CUDA-graph capture; validate the inputs once, "
                "then run the traced code under `with steerops.unchecked():`")
        # one cat and one copy. cat promotes to a common type, and an index's min and max
        # beside a bfloat16 statistic would be rounded to bfloat16 (1025 -> 1024): floating
        # statistics go to float64 first, so integers (exact below 2**53) and flags stay exact
        parts = [[t.reshape(-1) if not t.is_floating_point() or t.dtype == torch.float64
                  else t.reshape(-1).to(torch.float64)
                  for t in (got if isinstance(got, tuple) else (got,))]
                 for got, _, _, _ in self._items]
        values = torch.cat([t for ts in parts for t in ts]).tolist()
        start = 0
        for ts, (_, bad, exc_type, message) in zip(parts, self._items):
            size = sum(t.numel() for t in ts)
            mine = values[start:start + size]
            start += size
            if (bad(mine) if bad is not None else mine[0] != 0):
                raise exc_type(message() if callable(message) else message)


def require_tensor(name, t, *, floating=False, integer=False, allow_none=False):
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64), got {t.dtype}")
    if integer and t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def require_device(name, t, device):
    if t is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")


def rows_2d(name, t, D):
    """View (..., D) as contiguous rows (N, D)."""
    if t.dim() == 0 or t.shape[-1] != D:
        raise ValueError(f"{name} must have last dim {D}, got shape {tuple(t.shape)}")
    rows = t.reshape(-1, D)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < D):
        rows = rows.contiguous()
    return rows


def check_hidden(hidden, name="hidden"):
    require_tensor(name, hidden, floating=True)
    if hidden.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dim (..., D), got a 0-d tensor")


def check_residual(residual, hidden):
    if residual is None:
        return
    require_tensor("residual", residual, floating=True)
    require_device("residual", residual, hidden.device)
    if residual.shape != hidden.shape:
        raise ValueError(f"residual must have the shape of hidden {tuple(hidden.shape)}, "
                         f"got {tuple(residual.shape)}")
    if residual.dtype != hidden.dtype:
        raise TypeError(f"residual must have hidden's dtype {hidden.dtype}, got {residual.dtype}")


def per_row(name, t, hidden, N):
    """A per-row tensor of shape hidden.shape[:-1] or (N,), flattened to (N,)."""
    if tuple(t.shape) not in (tuple(hidden.shape[:-1]), (N,)):
        raise ValueError(f"{name} must have shape {tuple(hidden.shape[:-1])} or ({N},), "
                         f"got {tuple(t.shape)}")
    return t.reshape(N).contiguous()


def check_range(checks, name, index, low, high, what):
    """Values of ``index`` must lie in [low, high)."""
    if index.numel() == 0:
        return
    checks.add_stats(lambda: tuple(torch.aminmax(index)),
                     lambda lo_hi: lo_hi[0] < low or lo_hi[1] >= high, ValueError, lambda: (
                         f"{name} out of range: values must be in [{low}, {high}) ({what}), "
                         f"got min {int(index.min())} max {int(index.max())}"))


def check_unit_range(checks, name, w):
    # aminmax propagates NaN, and a NaN fails both comparisons: one kernel for all three
    checks.add_stats(lambda: tuple(torch.aminmax(w)),
                     lambda lo_hi: not (lo_hi[0] >= 0 and lo_hi[1] <= 1), ValueError,
                     f"{name} must be finite and in [0, 1]")


def check_finite(checks, name, t):
    message = f"{name} has NaN or Inf entries; the output would be NaN/Inf"
    if t.dtype == torch.float64:  # a float64 sum of float64 entries could overflow
        checks.add(lambda: ~torch.isfinite(t).all(), ValueError, message)
        return
    # one number, finite exactly when every entry is: the float64 sum of floats of at
    # most 32 bits cannot overflow (|entry| <= 3.4e38); NaN or opposite infinities make
    # it NaN
    checks.add_stats(lambda: t.sum(dtype=torch.float64), lambda v: not math.isfinite(v[0]),
                     ValueError, message)


def check_nonzero_rows(checks, name, v, why):
    # the smallest row max-abs is 0 exactly when some row is all zeros (a NaN row is
    # check_finite's)
    checks.add_stats(lambda: torch.linalg.vector_norm(v, ord=math.inf, dim=-1).amin(),
                     lambda m: m[0] == 0, ValueError, f"{name} has a zero-norm row, which {why}")


def check_mode(mode):
    """The registered steering mode called ``mode`` (a one-line error otherwise)."""
    return modes.get(mode)


def vector_arg(vector, D, device, mode, checks, model_note=""):
    """Validates steering vector(s) for ``mode``; returns them as (K, D) rows.
    ``model_note`` says where D comes from (a model's hidden size)."""
    spec = check_mode(mode)
    require_tensor("vector", vector, floating=True)
    if device is not None:
        require_device("vector", vector, device)
    if vector.device.type == "meta":
        raise ValueError("vector is on the meta device (shape only, no values); "
                         "materialise it first")
    if vector.dim() not in (1, 2) or vector.shape[-1] != D or vector.numel() == 0:
        raise ValueError(f"vector must have shape ({D},) or (K, {D}){model_note}, "
                         f"got {tuple(vector.shape)}")
    vec = vector.reshape(-1, D).contiguous()
    check_finite(checks, "vector", vec)
    if spec.unit:
        check_nonzero_rows(checks, "vector", vec, f"mode {mode!r} cannot normalise")
    return vec


def alpha_arg(alpha, hidden, N, compute_dtype, checks):
    """Returns (alpha_rows or None, alpha_scalar) for the op."""
    if isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, torch.Tensor)):
        raise TypeError(f"alpha must be a float or a floating tensor, got {type(alpha).__name__}")
    if not isinstance(alpha, torch.Tensor):
        if not math.isfinite(float(alpha)):
            raise ValueError(f"alpha must be finite, got {alpha}")
        if hidden.dtype == torch.float64:  # keep full precision for float64 compute
            return torch.full((N,), float(alpha), dtype=compute_dtype, device=hidden.device), 1.0
        return None, float(alpha)
    require_tensor("alpha", alpha, floating=True)
    require_device("alpha", alpha, hidden.device)
    check_finite(checks, "alpha", alpha)
    if alpha.numel() == 1:
        return alpha.to(compute_dtype).reshape(1).expand(N), 1.0
    if tuple(alpha.shape) == (N,):
        return alpha.to(compute_dtype), 1.0
    lead = tuple(hidden.shape[:-1])
    # a per-row alpha names every leading dim of hidden (size 1 to broadcast): a shorter
    # one, e.g. (B,) for hidden (B, T, D), would broadcast along the last leading dim
    # (per position, not per batch row) and is refused rather than guessed
    try:
        if alpha.dim() != len(lead):
            raise RuntimeError
        rows = alpha.expand(lead).reshape(N)
    except RuntimeError:
        hint = (f"; for one alpha per batch row use alpha[:, None] (shape ({lead[0]}, 1))"
                if len(lead) == 2 and tuple(alpha.shape) == (lead[0],) else "")
        raise ValueError(f"alpha must be a scalar, ({N},), or of shape {lead} (size-1 dims "
                         f"broadcast), got shape {tuple(alpha.shape)}{hint}") from None
    return rows.to(compute_dtype), 1.0


def steer_args(hidden, vector, alpha, mode, mask, vector_index, checks):
    """Validates steering arguments; returns (vector (K,D), alpha_rows, alpha_scalar,
    mask (N,) bool or None, vector_index (N,) or None)."""
    D = hidden.shape[-1]
    N = hidden.numel() // D if D else 0
    vec = vector_arg(vector, D, hidden.device, mode, checks)
    K = vec.shape[0]
    alpha_rows, alpha_scalar = alpha_arg(alpha, hidden, N, compute_dtype(hidden.dtype), checks)
    if mask is not None:
        require_tensor("mask", mask)
        require_device("mask", mask, hidden.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        mask = per_row("mask", mask, hidden, N)
    if vector_index is not None:
        require_tensor("vector_index", vector_index, integer=True)
        require_device("vector_index", vector_index, hidden.device)
        vector_index = widened(per_row("vector_index", vector_index, hidden, N))
        check_range(checks, "vector_index", vector_index, 0, K, f"vector has {K} rows")
    elif K > 1:
        raise ValueError(f"vector has {K} rows, so vector_index (one vector row per hidden "
                         f"row, shape ({N},)) is required")
    return vec, alpha_rows, alpha_scalar, mask, vector_index


def widened(index):
    """Index tensors narrower than int32 (int8, int16, uint8) as int32: range checks
    compare against bounds that need not fit the narrow type (uint8 cannot hold 300,
    int8 wraps past 127), and the kernels read int32 or int64."""
    if index.dtype in (torch.int8, torch.int16, torch.uint8):
        return index.to(torch.int32)
    return index


def index_arg(name, index, device, length=None):
    require_tensor(name, index, integer=True)
    require_device(name, index, device)
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    if length is not None and index.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries (as dst_index), got {index.shape[0]}")
    return widened(index).contiguous()


def check_source(source, hidden, D):
    require_tensor("source", source, floating=True)
    require_device("source", source, hidden.device)
    if source.dtype != hidden.dtype:
        raise TypeError(f"source must have hidden's dtype {hidden.dtype}, got {source.dtype}")
    return rows_2d("source", source, D)


def check_duplicates(checks, name, index):
    if index.numel() < 2:
        return
    def has_duplicates():
        s = index.sort().values
        return (s[1:] == s[:-1]).any()
    checks.add(has_duplicates, ValueError,
               f"{name} has duplicate entries; each destination row may be patched once per call")


def patch_args(hidden, source, dst_index, src_index, weight, direction, residual, checks):
    """Validates patch arguments; returns (source_rows, dst, src, weight, direction)."""
    check_hidden(hidden)
    check_residual(residual, hidden)
    D = hidden.shape[-1]
    N = hidden.numel() // D if D else 0
    src_rows = check_source(source, hidden, D)
    dst = index_arg("dst_index", dst_index, hidden.device)
    M = dst.shape[0]
    src = index_arg("src_index", src_index, hidden.device, M)
    check_range(checks, "dst_index", dst, 0, N, f"hidden has {N} rows")
    check_range(checks, "src_index", src, 0, src_rows.shape[0],
                f"source has {src_rows.shape[0]} rows")
    check_duplicates(checks, "dst_index", dst)
    if weight is not None:
        require_tensor("weight", weight, floating=True)
        require_device("weight", weight, hidden.device)
        if tuple(weight.shape) != (M,):
            raise ValueError(f"weight must have shape ({M},) (one per site), "
                             f"got {tuple(weight.shape)}")
        weight = weight.detach().contiguous()
        check_unit_range(checks, "weight", weight)
    if direction is not None:
        require_tensor("direction", direction, floating=True)
        require_device("direction", direction, hidden.device)
        if tuple(direction.shape) != (D,):
            raise ValueError(f"direction must have shape ({D},), got {tuple(direction.shape)}")
        direction = direction.detach().contiguous()
        check_finite(checks, "direction", direction)
        check_nonzero_rows(checks, "direction", direction.reshape(1, D),
                           "directional patching cannot normalise")
    return src_rows, dst, src, weight, direction


def steer_call(hidden, vector, alpha, mode, residual, mask, vector_index):
    """Validate a steering call and lay it out for the custom ops: hidden as (N, D) rows
    and the op's argument tuple. Shared by steer, steer_ and the benchmarks that time
    the launch apart from the validation."""
    check_hidden(hidden)
    check_residual(residual, hidden)
    checks = ValueChecks()
    vec, alpha_rows, alpha_scalar, mask, vidx = steer_args(
        hidden, vector, alpha, mode, mask, vector_index, checks)
    checks.run()
    D = hidden.shape[-1]
    x = rows_2d("hidden", hidden, D)
    res = None if residual is None else rows_2d("residual", residual, D)
    return x, (res, None, None, None, vec, alpha_rows, alpha_scalar, mask, vidx, mode)
