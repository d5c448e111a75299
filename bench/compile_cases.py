"""The kernel specializations the launchers produce, enumerated without a GPU.

The launchers (``steerops.kernels.steer_fwd`` ...) are called with CPU tensors
while their ``kernel[grid](...)`` calls are recorded, so the specializations are
exactly the ones the library launches (constexprs, argument types, 16-byte
divisibility, num_warps). Every combination of the steering kernels' flags is
enumerated (:func:`steer_flag_combinations`): residual, patch (plain /
weighted), source gradient, K vectors, per-row alpha, mask, mode, vector
gradient. ``compile_check`` compiles what this finds.
"""
import contextlib
import itertools

from steerops.ops import modes

# the modes the steering kernel computes (the others run on the reference path)
MODES = tuple(m.name for m in modes.REGISTRY.values() if m.kernel_code is not None)
N_ROWS = 64  # rows per recorded launch: enough for every launch choice, small to record


def _torch_dtypes():
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, fn, calls, case):
        self.fn, self.calls, self.case = fn, calls, case

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.case[0], self.fn, tuple(_stand_in(a) for a in args),
                               kwargs))
        return launch


def _stand_in(arg):
    """A one-element tensor of the same dtype for an aligned tensor argument: Triton
    specializes on a pointer's dtype and 16-byte alignment only, and thousands of
    recorded launches must not keep their full-size tensors alive."""
    if hasattr(arg, "data_ptr") and arg.data_ptr() % 16 == 0:
        import torch
        return torch.empty(1, dtype=arg.dtype)
    return arg


@contextlib.contextmanager
def _recording(calls, case):
    from steerops.kernels import patch, segment_sum, steer
    names = [(steer, "_steer_fwd_kernel"), (steer, "_steer_bwd_kernel"),
             (patch, "_patch_fwd_kernel"), (patch, "_patch_bwd_kernel"),
             (segment_sum, "_segment_sum_rows_kernel")]
    saved = [(m, n, getattr(m, n)) for m, n in names]
    try:
        for m, n, fn in saved:
            setattr(m, n, _Recorder(fn, calls, case))
        yield
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)


def steer_flag_combinations(kind, modes=MODES):
    """Every combination of the steering kernels' flags the launchers can produce, as
    the launchers canonicalise them: with no vector the steering flags are moot (one
    specialization); the backward writes a per-row alpha's gradient whenever alpha is
    per row, and the source gradient only for a patch. ``kind``: 'fwd' or 'bwd'."""
    for residual, patch in itertools.product((False, True), ("none", "patch", "weighted")):
        for dsource in ((False, True) if kind == "bwd" and patch != "none" else (False,)):
            base = dict(residual=residual, patch=patch, dsource=dsource)
            yield dict(base, steer=False)
            for vidx, alpha, mask, mode in itertools.product((False, True), (False, True),
                                                             (False, True), modes):
                for dvector in ((False, True) if kind == "bwd" else (False,)):
                    yield dict(base, steer=True, vidx=vidx, alpha=alpha, mask=mask, mode=mode,
                               dvector=dvector)


def flag_label(kind, flags):
    on = [k for k in ("residual", "dsource", "vidx", "alpha", "mask", "dvector") if flags.get(k)]
    patch = [] if flags["patch"] == "none" else [flags["patch"]]
    steer = [flags["mode"]] if flags["steer"] else ["no-steer"]
    return f"steer_{kind} " + "+".join(steer + patch + on)


def _steer_inputs(N, D, dtype):
    """The tensors a steering launch may take, made once per shape (thousands of
    launches allocating their own would fragment the heap into gigabytes)."""
    import torch
    idx = torch.arange(N)
    return dict(x=torch.randn(N, D, dtype=dtype), g=torch.randn(N, D, dtype=dtype),
                residual=torch.randn(N, D, dtype=dtype), source=torch.randn(N, D, dtype=dtype),
                patch_src=idx.flip(0), patch_weight=torch.rand(N), vector1=torch.randn(1, D,
                dtype=dtype), vector4=torch.randn(4, D, dtype=dtype), vector_index=idx % 4,
                alpha=torch.rand(N), mask=torch.ones(N, dtype=torch.uint8))


def _steer_launch(kind, flags, t):
    """Calls the launcher with the tensors ``t`` that produce ``flags``."""
    from steerops import kernels as K
    kw = {}
    if flags["residual"]:
        kw["residual"] = t["residual"]
    if flags["patch"] != "none":
        kw.update(source=t["source"], patch_src=t["patch_src"])
        if flags["patch"] == "weighted":
            kw["patch_weight"] = t["patch_weight"]
    if flags["steer"]:
        kw.update(vector=t["vector4" if flags["vidx"] else "vector1"],
                  mode_code=modes.get(flags["mode"]).kernel_code)
        for name in ("vector_index", "alpha", "mask"):
            if flags[{"vector_index": "vidx"}.get(name, name)]:
                kw[name] = t[name]
    inputs = K.RowInputs(**kw)
    if kind == "fwd":
        return K.steer_fwd(t["x"], inputs)
    return K.steer_bwd(t["g"], t["x"], inputs, need_dsource=flags["dsource"],
                       need_dvector=flags.get("dvector", False))


def _cases(D, dtype, modes, variants):
    """(label, launcher call) pairs: every flag combination of the steering kernels
    ('steer'), and the sparse patch and segment-sum kernels' variants ('sparse')."""
    import torch
    from steerops import kernels as K
    N = N_ROWS

    def t(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt)
    idx = torch.arange(N)
    acc = torch.float32
    if "steer" in variants:
        inputs = _steer_inputs(N, D, dtype)
        for kind in ("fwd", "bwd"):
            for flags in steer_flag_combinations(kind, modes):
                yield (flag_label(kind, flags),
                       lambda k=kind, f=flags: _steer_launch(k, f, inputs))
    if "sparse" in variants:
        for w in (False, True):
            for d in (False, True):
                kw = dict(weight=torch.rand(8, dtype=acc) if w else None,
                          direction=t(D) if d else None)
                tag = f"w={int(w)} dir={int(d)}"
                yield (f"patch_fwd {tag}", lambda kw=kw: K.patch_fwd(
                    t(N, D), t(8, D), idx[:8], idx[:8], **kw))
                yield (f"patch_bwd {tag}", lambda kw=kw: K.patch_bwd(
                    t(N, D), t(8, D), idx[:8], idx[:8], **kw))
        yield ("segment_sum", lambda: K.segment_sum_rows(
            t(N, D), idx % 5, torch.zeros(5, D, dtype=acc)))


def enumerate_specializations(d_values, dtypes, modes=MODES, variants=("steer", "sparse"),
                              cc=90):
    """The distinct kernel launches of the launchers over the grid, as they
    choose them for compute capability ``cc``: a list of dicts {kernel, fn,
    args, kwargs, cases}."""
    from steerops.kernels import config
    calls = []
    saved, config.TARGET_ARCH = config.TARGET_ARCH, cc
    try:
        for D in d_values:
            for dname in dtypes:
                for label, call in _cases(D, _torch_dtypes()[dname], modes, variants):
                    case = (f"{label} D={D} {dname}",)
                    with _recording(calls, case):
                        call()
    finally:
        config.TARGET_ARCH = saved
    found = {}
    for case, fn, args, kwargs in calls:
        key = (fn.__name__, _signature_key(args), tuple(sorted(kwargs.items(), key=str)))
        entry = found.setdefault(key, {"kernel": fn.__name__, "fn": fn, "args": args,
                                       "kwargs": kwargs, "cases": []})
        entry["cases"].append(case)
    return list(found.values())


def _signature_key(args):
    """What Triton specializes on: tensor dtype and 16-byte alignment, int value
    classes (1, divisible by 16, 32/64-bit), float."""
    out = []
    for a in args:
        if hasattr(a, "data_ptr"):
            out.append(("ptr", str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):
            out.append(("bool", a))
        elif isinstance(a, int):
            out.append(("int", a == 1, a % 16 == 0, abs(a) >= 2 ** 31))
        else:
            out.append((type(a).__name__,))
    return tuple(out)
