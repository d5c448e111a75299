"""Hopper (and Ampere) evidence without a GPU: compile every kernel
specialization the launchers produce for sm_90a / sm_80, read registers,
stack and spills from the cubin, and report them.

How: ``compile_cases`` enumerates the specializations exactly as the
launchers make them. Each is bound with Triton's own binder for a CUDA
backend and compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; the
``cuobjdump`` inside Triton's nvidia backend gives registers, stack and local
memory (``--dump-resource-usage``) and the SASS, where STL/LDL instructions are
local-memory spills and LDG.E.128/STG.E.128 are 128-bit vector accesses.

    steerops bench compile                  # what CI runs: every flag combination (fails on
                                            # any local memory or failed compile)
    steerops bench compile --subset hopper  # ... at every launch configuration, fp32 + bf16

Needs the Triton JIT (not the interpreter): run it with TRITON_INTERPRET unset.
These are compile-time figures, not measurements on a GPU.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from steerops.app.cli_args import Parser, output_folder, positive_int

from .compile_cases import enumerate_specializations

TARGETS = {"sm_90a": 90, "sm_80": 80}
# per-SM limits used for the occupancy estimate (CUDA occupancy calculator values)
SM_LIMITS = {90: dict(regs=65536, warps=64, smem=227 * 1024, blocks=32),
             80: dict(regs=65536, warps=64, smem=163 * 1024, blocks=32)}
# D values that reach every launch configuration (BLOCK_D, single pass or looped, warps)
# the launchers choose for rows of 512+ columns, forward and backward
EVERY_D = (512, 1024, 2048, 4096, 8192, 16384, 32768)
FULL_D = (768, 2048, 4096, 5120, 8192, 16384, 32768)
# the CI gate: 2048 and 4096 (both kernels single pass), 8192 (forward single pass at
# 8 warps, backward looped) and 32768 (forward looped); every flag combination at each
CI_D = (2048, 4096, 8192, 32768)


# ----------------------------------------------------------------------------- compiling

def _backend_binder(fn, cc):
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", cc, 32)
    backend = CUDABackend(target)
    return target, backend, create_function_from_signature(fn.signature, fn.params, backend)


def compile_one(entry, cc):
    """Compiles one specialization for compute capability ``cc``; returns its
    resource record (registers, spills, stack, vector accesses, occupancy)."""
    import triton
    from triton.compiler import ASTSource
    fn = entry["fn"]
    target, backend, binder = _backend_binder(fn, cc)
    bound, specialization, options = binder(*entry["args"], **entry["kwargs"])
    options, signature, constexprs, attrs = fn._pack_args(backend, entry["kwargs"], bound,
                                                          specialization, options)
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    seconds = time.perf_counter() - t0
    usage, sass = _cuobjdump(kernel.asm["cubin"])
    warps = kernel.metadata.num_warps
    shared = kernel.metadata.shared
    regs = usage.get("REG", 0)
    lds = len(re.findall(r"\bLDG\.E[\w.]*", sass))
    sts = len(re.findall(r"\bSTG\.E[\w.]*", sass))
    vec = len(re.findall(r"\b(?:LDG|STG)\.E(?:\.\w+)*\.128\b", sass))
    constexpr_names = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
    return {
        "kernel": entry["kernel"], "cc": cc, "cases": entry["cases"],
        "constexprs": {k: _plain(v) for k, v in constexpr_names.items()},
        "num_warps": warps, "registers": regs, "stack_bytes": usage.get("STACK", 0),
        "local_bytes": usage.get("LOCAL", 0), "shared_bytes": shared,
        "spill_stores": len(re.findall(r"\bSTL\b", sass)),
        "spill_loads": len(re.findall(r"\bLDL\b", sass)),
        "global_accesses": lds + sts, "vector128_accesses": vec,
        # LDGSTS: cp.async global-to-shared copies, what Triton's software pipeliner
        # emits for loads it issues stages ahead
        "async_copies": len(re.findall(r"\bLDGSTS\b", sass)),
        "programs_per_sm": occupancy(regs, warps, shared, cc),
        "compile_seconds": round(seconds, 2),
    }


def _plain(v):
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _cuobjdump(cubin):
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(f.name)
    line = next((ln for ln in usage.splitlines() if "REG:" in ln), "")
    fields = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return fields, sass


def occupancy(regs, warps, shared, cc):
    """Resident programs per SM from registers (allocated per warp in units of
    256), warps and shared memory: the CUDA occupancy calculator's rules."""
    lim = SM_LIMITS[cc]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * warps)
    by_warps = lim["warps"] // warps
    by_smem = lim["smem"] // shared if shared else lim["blocks"]
    return int(min(by_regs, by_warps, by_smem, lim["blocks"]))


# ----------------------------------------------------------------------------- driver

SUBSETS = {
    # the CI gate (about 12 minutes on 2 cores): every flag combination of every kernel
    # at the single-pass and looped configurations of CI_D, fp32, sm_90a
    "ci": dict(d_values=CI_D, dtypes=("fp32",), targets=("sm_90a",)),
    # every flag combination at every launch configuration, fp32 and bf16, sm_90a
    # (about 45 minutes on 2 cores; fp16 compiles as bf16 does, but for the convert)
    "hopper": dict(d_values=EVERY_D, dtypes=("fp32", "bf16"), targets=("sm_90a",)),
    # the widths of real models in all three dtypes, for H100 and A100 (hours)
    "full": dict(d_values=FULL_D, dtypes=("fp32", "fp16", "bf16"),
                 targets=("sm_90a", "sm_80")),
}


_worker_entries = None


def _init_worker(settings):
    """Each compile process enumerates the specializations once (JIT functions
    do not pickle; the enumeration is deterministic)."""
    global _worker_entries
    from steerops.kernels import config
    os.environ.pop("TRITON_INTERPRET", None)
    config.BWD_ROW_STAGES = settings.get("bwd_row_stages", config.BWD_ROW_STAGES)
    # FP fusion on, as the Triton releases that run these kernels default to (newer
    # releases warn that their default will change)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    _worker_entries = {t: enumerate_specializations(settings["d_values"], settings["dtypes"],
                                                    cc=TARGETS[t])
                       for t in settings["targets"]}


def _work(job):
    """Worker: (index, target name) -> record."""
    index, target = job
    entry = _worker_entries[target][index]
    try:
        return compile_one(entry, TARGETS[target])
    except Exception as exc:  # a failed compile is a result, reported and failing the check
        return {"kernel": entry["kernel"], "cc": TARGETS[target], "cases": entry["cases"],
                "error": f"{type(exc).__name__}: {str(exc)[:400]}"}


def run(subset="ci", out_dir=None, workers=2, progress=True, bwd_row_stages=1):
    from tqdm.auto import tqdm
    settings = dict(SUBSETS[subset], bwd_row_stages=bwd_row_stages)
    _init_worker(settings)
    jobs = [(i, t) for t in settings["targets"] for i in range(len(_worker_entries[t]))]
    desc = "compiling for " + "/".join(settings["targets"])
    if workers > 1:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                    initializer=_init_worker, initargs=(settings,)) as pool:
            records = list(tqdm(pool.map(_work, jobs, chunksize=4), total=len(jobs),
                                disable=not progress, desc=desc))
    else:
        records = [_work(j) for j in tqdm(jobs, disable=not progress, desc=desc)]
    result = {"subset": subset,
              "settings": {k: v if isinstance(v, int) else list(v) for k, v in settings.items()},
              "environment": _environment(), "records": records, "summary": summary(records)}
    if out_dir:
        from .provenance import save_results
        stages = "" if bwd_row_stages == 1 else f"_bwd_stages{bwd_row_stages}"
        save_results(out_dir, f"compile_{subset}{stages}", result, markdown(result))
    return result


def _environment():
    import platform

    import torch
    import triton

    from .provenance import git_commit
    return {"triton": triton.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "commit": git_commit(),
            "note": "compiled ahead of time on a machine without a GPU; no run-time figure"}


def uses_local_memory(record):
    """Any local memory: a stack frame, local bytes, or spill loads/stores (the gate
    allows none; a stack frame without STL/LDL still means ptxas parked a value)."""
    return bool(record["stack_bytes"] or record["local_bytes"] or record["spill_stores"]
                or record["spill_loads"])


def summary(records):
    ok = [r for r in records if "error" not in r]
    out = {"specializations": len(records), "failed": len(records) - len(ok),
           "spilling": sum(1 for r in ok if uses_local_memory(r)),
           "max_registers": max((r["registers"] for r in ok), default=0)}
    for kernel in sorted({r["kernel"] for r in ok}):
        rs = [r for r in ok if r["kernel"] == kernel]
        out[kernel] = {"max_registers": max(r["registers"] for r in rs),
                       "min_programs_per_sm": min(r["programs_per_sm"] for r in rs),
                       "spilling": sum(1 for r in rs if uses_local_memory(r)),
                       "pipelined": sum(1 for r in rs if r.get("async_copies", 0)),
                       "vector128_fraction": round(
                           sum(r["vector128_accesses"] for r in rs)
                           / max(1, sum(r["global_accesses"] for r in rs)), 3)}
    return out


def markdown(result):
    s = result["summary"]
    lines = [f"# Kernel resources, compiled ahead of time ({result['subset']} grid)", "",
             f"triton {result['environment']['triton']}, commit {result['environment']['commit']}; "
             f"{s['specializations']} specializations, {s['failed']} failed to compile, "
             f"{s['spilling']} spill; max registers {s['max_registers']}; backward row "
             f"stages {result['settings'].get('bwd_row_stages', 1)}. "
             f"Compile-time figures (no GPU run).", "",
             "| kernel | max regs | min programs/SM | spilling | pipelined (cp.async) "
             "| 128-bit access fraction |",
             "|---|---|---|---|---|---|"]
    for k, v in s.items():
        if isinstance(v, dict):
            lines.append(f"| {k} | {v['max_registers']} | {v['min_programs_per_sm']} | "
                         f"{v['spilling']} | {v['pipelined']} | {v['vector128_fraction']:.2f} |")
    lines += ["", "| target | kernel | BLOCK_D | single pass | warps | regs | stack | spill st/ld "
              "| programs/SM | first case |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if "error" in r:
            lines.append(f"| cc {r['cc']} | {r['kernel']} | | | | FAILED: {r['error'][:80]} "
                         f"| | | | {r['cases'][0]} |")
            continue
        c = r["constexprs"]
        lines.append(f"| cc {r['cc']} | {r['kernel']} | {c.get('BLOCK_D', '')} | "
                     f"{c.get('SINGLE_PASS', '')} | {r['num_warps']} | {r['registers']} | "
                     f"{r['stack_bytes']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['programs_per_sm']} | {r['cases'][0]} |")
    return "\n".join(lines)


def build_parser():
    p = Parser(
        prog="steerops bench compile",
        description="Compile every kernel specialization the launchers produce for sm_90a "
                    "(H100) and sm_80 (A100) without a GPU; report registers, spills, stack, "
                    "128-bit access fraction and occupancy as JSON + Markdown.")
    p.add_argument("--subset", default="ci", choices=list(SUBSETS),
                   help="every flag combination the launchers produce at: 'ci' D 2048, 4096, 8192, "
                        "32768, fp32, sm_90a (about 12 min on 2 cores); 'hopper' every launch "
                        "configuration (D 512..32768), fp32 and bf16, sm_90a (about 45 min); "
                        "'full' D 768..32768, fp32/fp16/bf16, sm_90a and sm_80 (hours) "
                        "(default: ci)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "compile"),
                   type=output_folder, help="output folder (default: bench/results/compile)")
    p.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="compile processes (default: up to 4)")
    p.add_argument("--bwd-row-stages", type=positive_int, default=1,
                   help="software-pipelining stages of the steering backward's row loop "
                        "(kernels/config.py BWD_ROW_STAGES; default: 1, the launchers' own)")
    p.add_argument("--no-fail", action="store_true",
                   help="exit 0 even when a specialization spills or fails to compile")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("steerops bench compile: unset TRITON_INTERPRET (the check compiles with the "
              "Triton JIT, not the interpreter)", file=sys.stderr)
        return 2
    result = run(args.subset, args.out, args.workers, progress=not args.no_progress,
                 bwd_row_stages=args.bwd_row_stages)
    print(markdown(result).split("\n\n| target")[0])
    print(json.dumps({k: v for k, v in result["summary"].items() if not isinstance(v, dict)}))
    bad = result["summary"]["failed"] + result["summary"]["spilling"]
    return 0 if args.no_fail or not bad else 1


if __name__ == "__main__":
    sys.exit(main())
