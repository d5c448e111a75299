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
import argparse
import os
import sys

import torch

import steerops
from steerops import reference as R

from .provenance import git_commit, save_results

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


def _steer_case(N, D, dtype, mode, K):
    h = torch.randn(N, D, device=DEVICE, dtype=dtype)
    v = torch.randn(K, D, device=DEVICE, dtype=torch.float32)
    vi = torch.randint(0, K, (N,), device=DEVICE) if K > 1 else None
    alpha = torch.rand(N, device=DEVICE)
    return h, v, vi, alpha


def _compiled(fn, autotune):
    """torch.compile providers of the same eager function: default, and max-autotune."""
    out = {"compile": torch.compile(fn)}
    if autotune:
        out["compile_max_autotune"] = torch.compile(fn, mode="max-autotune")
    return out


def steer_cases(N, D, dtype, mode, K, which, autotune=False):
    """{provider: fn} for one steering case and the bytes it must move."""
    h, v, vi, alpha = _steer_case(N, D, dtype, mode, K)
    s = h.element_size()
    eager = lambda h, v, a: R.intervene_forward(h, vector=v, alpha=a, mode=mode,  # noqa: E731
                                                vector_index=vi)
    ours = lambda h, v, a: steerops.steer(h, v, a, mode=mode, vector_index=vi)  # noqa: E731
    vec_bytes = K * D * 4 + N * 4 + (N * 8 if vi is not None else 0)
    if which == "fwd":
        def make(fn):
            def run():
                with torch.no_grad():
                    fn(h, v, alpha)
            return run
        nbytes = 2 * N * D * s + vec_bytes
    else:
        hg = h.clone().requires_grad_(True)
        vg, ag = v.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
        g = torch.randn_like(h)

        def make(fn):
            if which == "bwd":
                out = fn(hg, vg, ag)
                return lambda: torch.autograd.grad(out, [hg, vg, ag], g, retain_graph=True)
            return lambda: torch.autograd.grad(fn(hg, vg, ag), [hg, vg, ag], g)
        bwd_bytes = 3 * N * D * s + vec_bytes  # read g and h, write dh
        nbytes = bwd_bytes if which == "bwd" else bwd_bytes + 2 * N * D * s + vec_bytes
    providers = {"steerops": make(ours), "eager": make(eager)}
    providers.update({name: make(fn) for name, fn in _compiled(eager, autotune).items()})
    return providers, nbytes


def patch_cases(N, D, M, dtype, autotune=False):
    h = torch.randn(N, D, device=DEVICE, dtype=dtype)
    src = torch.randn(N, D, device=DEVICE, dtype=dtype)
    dst = torch.randperm(N, device=DEVICE)[:M]
    si = torch.randint(0, N, (M,), device=DEVICE)

    def eager(h, src):
        h.index_copy_(0, dst, src.index_select(0, si))

    def ours(h, src):
        with steerops.unchecked():
            steerops.patch_(h, src, dst, si)

    nbytes = 2 * M * D * h.element_size() + 2 * M * 8
    fns = dict(steerops=ours, eager=eager, **_compiled(eager, autotune))
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
                                rows += _measure(do_bench, providers, nbytes, copy, op="steer",
                                                 mode=mode, pass_=which, dtype=dname, N=N, D=D,
                                                 K=K)
                if "patch" in ops and "fwd" in modes:
                    for M in Ms:
                        if M > N:
                            continue
                        providers, nbytes = patch_cases(N, D, M, dtype, autotune)
                        rows += _measure(do_bench, providers, nbytes, copy, op="patch_",
                                         mode="full", pass_="fwd", dtype=dname, N=N, D=D, M=M)
    result = {"device": torch.cuda.get_device_name(), "driver": torch.version.cuda,
              "torch": torch.__version__, "triton": triton.__version__,
              "commit": git_commit(), "copy_GBps": copy, "rows": rows}
    table = _markdown(result)
    save_results(out_dir, "kernels", result, table)
    _plot(result, out_dir)
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
                         pct_copy=100 * gbps / copy))
    return rows


def _markdown(result):
    lines = [f"Device {result['device']} (CUDA {result['driver']}), torch {result['torch']}, "
             f"triton {result['triton']}, commit {result['commit']}; copy bandwidth "
             f"{result['copy_GBps']:.0f} GB/s (read + write).", "",
             "| op | mode | pass | dtype | N | D | K/M | provider | us | GB/s | % copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            continue
        lines.append(f"| {r['op']} | {r['mode']} | {r['pass_']} | {r['dtype']} | {r['N']} | "
                     f"{r['D']} | {r.get('K', r.get('M'))} | {r['provider']} | "
                     f"{1e3 * r['ms']:.1f} | {r['GBps']:.0f} | {r['pct_copy']:.0f} |")
    return "\n".join(lines)


def _plot(result, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "error" not in r and r["op"] == "steer"
            and r["pass_"] == "fwd" and r["dtype"] == "bf16" and r["N"] == max(
                x["N"] for x in result["rows"] if x["op"] == "steer")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for prov in ("steerops", "eager", "compile"):
        pts = sorted((r["D"], r["GBps"]) for r in rows if r["provider"] == prov
                     and r["mode"] == rows[0]["mode"])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=prov)
    ax.axhline(result["copy_GBps"], color="gray", ls="--", label="copy")
    ax.set(xlabel="D", ylabel="GB/s", title=f"steer fwd {rows[0]['mode']} bf16, N={rows[0]['N']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kernels_steer_fwd.png"), dpi=120)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(
        prog="steerops bench kernels",
        description="Kernel benchmarks on a CUDA GPU: steerops vs eager PyTorch vs torch.compile, "
                    "do_bench medians, GB/s and %% of the measured copy bandwidth.")
    p.add_argument("--quick", action="store_true", help="a smaller shape grid")
    p.add_argument("--ops", nargs="*", default=["steer", "patch"], choices=["steer", "patch"],
                   help="ops to time (default: steer patch)")
    p.add_argument("--modes", nargs="*", default=["fwd", "bwd", "fwdbwd"],
                   choices=["fwd", "bwd", "fwdbwd"], help="passes to time (default: all)")
    p.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES),
                   help="dtypes (default: all)")
    p.add_argument("--steer-modes", nargs="*", default=["norm_scaled", "add"],
                   choices=["add", "norm_scaled", "ablate", "clamp"],
                   help="steering modes (default: norm_scaled add)")
    p.add_argument("--K", nargs="*", type=int, default=[1, 8],
                   help="numbers of per-row vectors (default: 1 8)")
    p.add_argument("--out", default=None,
                   help="output folder (default: bench/results/kernels_<gpu>)")
    p.add_argument("--autotune", action="store_true",
                   help="add torch.compile(mode='max-autotune') as a provider (slow to compile)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
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
