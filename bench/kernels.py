"""Kernel benchmarks (GPU only): steerops vs eager PyTorch vs torch.compile.

    steerops bench kernels                 # full grid, writes bench/results/kernels_<gpu>/
    steerops bench kernels --quick         # a few shapes
    steerops bench kernels --ops steer --modes fwd --dtypes bf16

Timings are triton.testing.do_bench medians. Every case states the bytes it
must move (reads + writes of the rows it touches); GB/s is reported beside the
copy bandwidth measured in the same run (a large device-to-device copy, bytes
read + written), so "% of copy" compares like with like. Providers: steerops,
eager PyTorch (the plain-PyTorch reference, standard ops), torch.compile of
that same function (default, and mode="max-autotune" with --autotune).

Refuses to run under TRITON_INTERPRET or without CUDA: interpreter timings mean
nothing.
"""
import os
import sys

import torch

import steerops
from steerops.ops import modes as steering_modes
from steerops.ops.validation import steer_call
from steerops.ops import reference as R
from steerops.ops.custom_ops import intervene_backward_op, intervene_impl
from steerops.kernels import config
from steerops.app.cli_args import Parser, output_folder, positive_int

from .kernels_report import markdown, plot, predict_markdown
from .provenance import git_commit, repo_relative, save_results

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL_N = (1, 64, 4096, 16384, 65536)
FULL_D = (768, 2048, 4096, 5120, 8192, 16384)
FULL_M = (64, 4096, 65536)
QUICK_N = (64, 4096, 16384)
QUICK_D = (2048, 4096, 5120)
QUICK_M = (64, 4096)
MAX_BYTES = 6 * 2**30  # skip cases whose tensors would not fit comfortably
DEVICE = "cuda"  # tests build the providers on the CPU to check their logic


def refuse_reason():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the interpreter's timings say nothing about the kernels"
    if not torch.cuda.is_available():
        return "no CUDA device: kernel benchmarks need a GPU"
    return None


def copy_bandwidth(do_bench):
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(2**30 // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- byte model

NOMINAL_COPY_GBPS = {"H100": 3000.0}  # read + write, what a large D2D copy reaches


def steer_bytes(N, D, elem, K, which):
    """Bytes a steering pass must move: each row read once and written once
    (forward), g and h read and dh written (backward), plus the fp32 vectors,
    per-row alphas and (K > 1) int64 vector indices."""
    vec = K * D * 4 + N * 4 + (N * 8 if K > 1 else 0)
    fwd = 2 * N * D * elem + vec
    bwd = 3 * N * D * elem + vec
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[which]


def patch_bytes(M, D, elem):
    """Sparse patch_: M source rows read, M destination rows written, two int64 indices."""
    return 2 * M * D * elem + 2 * M * 8


# A kernel cannot finish faster than a launch: an empty kernel timed by do_bench on
# an H100 takes a few microseconds (an assumed round figure, not measured here), so
# small shapes are floored at this per launch instead of a nonsense 0.002 us.
LAUNCH_FLOOR_US = 3.0


def predicted_us(nbytes, copy_gbps, launches=1):
    """The kernel's floor: the time to move ``nbytes`` at the copy bandwidth, and
    never below ``launches`` x the launch floor."""
    return max(nbytes / (copy_gbps * 1e9) * 1e6, launches * LAUNCH_FLOOR_US)


def _launch_config(D, which):
    """(kernel, BLOCK_D, SINGLE_PASS, num_warps) the launchers pick for rows of D."""
    if which == "fwd":
        block, single = config.row_block(D)
        return "_steer_fwd_kernel", block, single, config.row_warps(block)
    block, single, warps = config.backward_row_launch(D)
    return "_steer_bwd_kernel", block, single, warps


def _resources(report, kernel, block, single, dtype):
    """Max registers / min programs per SM / spills of the compiled specializations
    (``steerops bench compile`` report) for this launch configuration, sm_90a."""
    recs = [r for r in (report or {}).get("records", []) if "error" not in r
            and r["cc"] == 90 and r["kernel"] == kernel
            and r["constexprs"].get("BLOCK_D") == block
            and r["constexprs"].get("SINGLE_PASS") == single
            and any(c.endswith(f" {dtype}") for c in r["cases"])]
    if not recs:
        return {}
    return {"registers": max(r["registers"] for r in recs),
            "programs_per_sm": min(r["programs_per_sm"] for r in recs),
            "spilling": sum(1 for r in recs if r["spill_stores"] or r["spill_loads"]
                            or r["stack_bytes"] or r["local_bytes"])}


def predict(Ns, Ds, Ks, dtypes, passes, copy_gbps, report=None):
    """The byte/time model without a GPU: for every steering shape, the bytes it
    must move, the time that takes at ``copy_gbps`` and the kernel configuration
    with its compiled resources."""
    rows = []
    for dname in dtypes:
        elem = DTYPES[dname].itemsize
        for N in Ns:
            for D in Ds:
                for K in Ks:
                    for which in passes:
                        nbytes = steer_bytes(N, D, elem, K, which)
                        kernels = ["fwd", "bwd"] if which == "fwdbwd" else [which]
                        launch = {}
                        for k in kernels:
                            name, block, single, warps = _launch_config(D, k)
                            launch[k] = dict(kernel=name, BLOCK_D=block, single_pass=single,
                                             num_warps=warps,
                                             **_resources(report, name, block, single, dname))
                        rows.append(dict(op="steer", pass_=which, dtype=dname, N=N, D=D, K=K,
                                         bytes=nbytes,
                                         predicted_us=predicted_us(nbytes, copy_gbps,
                                                                   len(kernels)),
                                         launch=launch))
    return rows


def run_predict(out_dir, quick):
    """``steerops bench kernels --predict``: the model for a CPU-only reader."""
    import json
    # the widest sm_90a report there is: every flag combination at every launch
    # configuration ('hopper'), else the older per-width grid ('full')
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile")
    report_path = next((os.path.join(folder, f"compile_{name}.json") for name in ("hopper", "full")
                        if os.path.exists(os.path.join(folder, f"compile_{name}.json"))), None)
    report = json.load(open(report_path)) if report_path else None
    copy = NOMINAL_COPY_GBPS["H100"]
    rows = predict(QUICK_N if quick else FULL_N, QUICK_D if quick else FULL_D, (1, 8),
                   ("bf16", "fp32"), ("fwd", "bwd"), copy, report)
    result = {"basis": "nominal H100 copy bandwidth (read + write), not measured",
              "copy_GBps": copy, "launch_floor_us": LAUNCH_FLOOR_US, "commit": git_commit(),
              "compile_report": repo_relative(report_path) if report else None, "rows": rows}
    table = predict_markdown(result)
    save_results(out_dir, "kernels_predicted", result, table)
    return result, table


def _steer_case(N, D, dtype, K):
    h = torch.randn(N, D, device=DEVICE, dtype=dtype)
    v = torch.randn(K, D, device=DEVICE, dtype=torch.float32)
    vi = torch.randint(0, K, (N,), device=DEVICE) if K > 1 else None
    alpha = torch.rand(N, device=DEVICE)
    return h, v, vi, alpha


def _compiled(fn, autotune):
    """torch.compile providers of the same eager function: default, and max-autotune.

    Dynamo is reset first: every case's eager function shares one code object, so
    without a reset the ninth case would pass dynamo's recompile limit and the
    "compile" row would silently time eager code, and a shape seen after another
    would be compiled with dynamic shapes instead of for itself."""
    import torch._dynamo
    torch._dynamo.reset()
    out = {"compile": torch.compile(fn)}
    if autotune:
        out["compile_max_autotune"] = torch.compile(fn, mode="max-autotune")
    return out


def steer_cases(N, D, dtype, mode, K, which, autotune=False):
    """{provider: fn} for one steering case and the bytes it must move."""
    h, v, vi, alpha = _steer_case(N, D, dtype, K)
    s = h.element_size()
    eager = lambda h, v, a: R.intervene_forward(h, vector=v, alpha=a, mode=mode,  # noqa: E731
                                                vector_index=vi)
    ours = lambda h, v, a: steerops.steer(h, v, a, mode=mode, vector_index=vi)  # noqa: E731

    def ours_unchecked(h, v, a):
        with steerops.unchecked():
            return ours(h, v, a)
    nbytes = steer_bytes(N, D, s, K, which)
    if which == "fwd":
        def make(fn):
            def run():
                with torch.no_grad():
                    fn(h, v, alpha)
            return run
    else:
        hg = h.clone().requires_grad_(True)
        vg, ag = v.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
        g = torch.randn_like(h)

        def make(fn):
            if which == "bwd":
                out = fn(hg, vg, ag)
                return lambda: torch.autograd.grad(out, [hg, vg, ag], g, retain_graph=True)
            return lambda: torch.autograd.grad(fn(hg, vg, ag), [hg, vg, ag], g)
    # steerops: the public op as users call it (validated: one host sync for the value
    # checks); _unchecked: under steerops.unchecked(); _launch: the forward's kernel launch,
    # or the backward op, alone on arguments validated once. Apart, they show where a
    # call's time goes.
    providers = {"steerops": make(ours), "steerops_unchecked": make(ours_unchecked)}
    x, args = steer_call(h, v, alpha, mode, None, None, vi)
    if which == "fwd":
        providers["steerops_launch"] = lambda: intervene_impl(x, *args, None)
    else:
        # the backward op alone (kernel + second-stage sum of the vector-gradient
        # partials), without autograd: how much of a backward the engine costs
        if which == "bwd":
            providers["steerops_launch"] = lambda: intervene_backward_op(
                g, x, *args, need_dsource=False, need_dvector=True, need_dalpha=True)
        # the backward's row loop software-pipelined (kernels/config.py BWD_ROW_STAGES)
        providers["steerops_pipelined"] = _with_bwd_row_stages(make(ours_unchecked), 2)
    providers["eager"] = make(eager)
    providers.update({name: make(fn) for name, fn in _compiled(eager, autotune).items()})
    return providers, nbytes


def _with_bwd_row_stages(run, stages):
    """``run`` with the steering backward launched at ``stages`` row-loop stages."""
    def staged():
        saved, config.BWD_ROW_STAGES = config.BWD_ROW_STAGES, stages
        try:
            return run()
        finally:
            config.BWD_ROW_STAGES = saved
    return staged


def patch_cases(N, D, M, dtype, autotune=False):
    h = torch.randn(N, D, device=DEVICE, dtype=dtype)
    src = torch.randn(N, D, device=DEVICE, dtype=dtype)
    dst = torch.randperm(N, device=DEVICE)[:M]
    si = torch.randint(0, N, (M,), device=DEVICE)

    def eager(h, src):
        h.index_copy_(0, dst, src.index_select(0, si))

    def ours(h, src):
        steerops.patch_(h, src, dst, si)

    def ours_unchecked(h, src):
        with steerops.unchecked():
            steerops.patch_(h, src, dst, si)

    nbytes = patch_bytes(M, D, h.element_size())
    fns = dict(steerops=ours, steerops_unchecked=ours_unchecked, eager=eager,
               **_compiled(eager, autotune))
    return {name: (lambda fn=fn: fn(h, src)) for name, fn in fns.items()}, nbytes


def run(ops, modes, dtypes, Ns, Ds, Ms, Ks, steer_modes, out_dir, autotune=False):
    import triton
    from triton.testing import do_bench
    reason = refuse_reason()
    if reason:
        raise SystemExit(f"steerops bench kernels: refusing to run: {reason}")
    os.makedirs(out_dir, exist_ok=True)
    copy = copy_bandwidth(do_bench)
    rows = []
    result = {"device": torch.cuda.get_device_name(), "driver": torch.version.cuda,
              "torch": torch.__version__, "triton": triton.__version__,
              "commit": git_commit(), "copy_GBps": copy, "rows": rows, "complete": False}

    def measured(new_rows):
        # written after every case: a run stopped by a time limit keeps what it measured
        rows.extend(new_rows)
        save_results(out_dir, "kernels", result, markdown(result))
    for dname in dtypes:
        dtype = DTYPES[dname]
        for N in Ns:
            for D in Ds:
                if N * D * 4 * 6 > MAX_BYTES:
                    continue
                if "steer" in ops:
                    for mode in steer_modes:
                        for K in Ks:
                            for which in modes:
                                providers, nbytes = steer_cases(N, D, dtype, mode, K, which,
                                                                autotune)
                                measured(_measure(do_bench, providers, nbytes, copy,
                                                  op="steer", mode=mode, pass_=which,
                                                  dtype=dname, N=N, D=D, K=K))
                if "patch" in ops and "fwd" in modes:
                    for M in Ms:
                        if M > N:
                            continue
                        providers, nbytes = patch_cases(N, D, M, dtype, autotune)
                        measured(_measure(do_bench, providers, nbytes, copy, op="patch_",
                                          mode="full", pass_="fwd", dtype=dname, N=N, D=D,
                                          M=M))
    result["complete"] = True
    table = markdown(result)
    save_results(out_dir, "kernels", result, table)
    plot(result, out_dir)
    return result, table


def _measure(do_bench, providers, nbytes, copy, **case):
    rows = []
    for name, fn in providers.items():
        try:
            ms = do_bench(fn)
        except Exception as exc:  # a provider that fails is reported, not hidden
            rows.append(dict(case, provider=name, error=repr(exc)[:200]))
            continue
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append(dict(case, provider=name, ms=ms, bytes=nbytes, GBps=gbps,
                         pct_copy=100 * gbps / copy, predicted_us=predicted_us(nbytes, copy)))
    return rows


def build_parser():
    p = Parser(
        prog="steerops bench kernels",
        description="Kernel benchmarks on a CUDA GPU: steerops vs eager PyTorch vs torch.compile, "
                    "do_bench medians, GB/s and % of the measured copy bandwidth.")
    p.add_argument("--quick", action="store_true", help="a smaller shape grid")
    p.add_argument("--ops", nargs="+", default=["steer", "patch"], choices=["steer", "patch"],
                   help="ops to time (default: steer patch)")
    p.add_argument("--modes", nargs="+", default=["fwd", "bwd", "fwdbwd"],
                   choices=["fwd", "bwd", "fwdbwd"], help="passes to time (default: all)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                   help="dtypes (default: all)")
    p.add_argument("--steer-modes", nargs="+", default=["norm_scaled", "add"],
                   choices=steering_modes.names(),
                   help="steering modes (default: norm_scaled add)")
    p.add_argument("--K", nargs="+", type=positive_int, default=[1, 8],
                   help="numbers of per-row vectors (default: 1 8)")
    p.add_argument("--out", default=None, type=output_folder,
                   help="output folder (default: bench/results/kernels_<gpu>)")
    p.add_argument("--predict", action="store_true",
                   help="no GPU: print the byte/time model (bytes moved, time at the nominal "
                        "H100 copy bandwidth) with each launch's compiled registers")
    p.add_argument("--autotune", action="store_true",
                   help="add torch.compile(mode='max-autotune') as a provider (slow to compile)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.predict:
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       "kernels_predicted_H100")
        _, table = run_predict(out, args.quick)
        print(table)
        return 0
    reason = refuse_reason()
    if reason:
        print(f"steerops bench kernels: refusing to run: {reason}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name().replace(" ", "_")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernels_{name}")
    _, table = run(args.ops, args.modes, args.dtypes, QUICK_N if args.quick else FULL_N,
                   QUICK_D if args.quick else FULL_D, QUICK_M if args.quick else FULL_M,
                   args.K, args.steer_modes, out, autotune=args.autotune)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
