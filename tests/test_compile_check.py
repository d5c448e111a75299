"""Hopper evidence in CI: every kernel specialization the launchers produce, every
flag combination, compiles for sm_90a with no local memory (``steerops bench compile
--subset ci``), and the enumeration / occupancy / byte-model logic on hand-made cases."""
import json
import os
import subprocess
import sys

import pytest

from steerops.bench import compile_cases as cases
from steerops.bench import compile_check as C
from steerops.bench import kernels as KB
from steerops.kernels import config


def test_occupancy_follows_the_register_file():
    # 128 regs x 8 warps: 32 KiB registers of 64 KiB -> 2 programs per SM
    assert C.occupancy(128, 8, 0, 90) == 2
    assert C.occupancy(122, 8, 0, 90) == 2     # rounded up to 128 per thread
    assert C.occupancy(129, 8, 0, 90) == 1
    assert C.occupancy(32, 4, 0, 90) == 16     # warp limit: 64 / 4
    assert C.occupancy(32, 4, 100 * 1024, 90) == 2  # shared-memory limit


def test_enumeration_covers_every_flag_combination():
    fwd = list(cases.steer_flag_combinations("fwd"))
    bwd = list(cases.steer_flag_combinations("bwd"))
    # residual x patch (none / plain / weighted) x [no steering | K vectors x per-row alpha
    # x mask x mode]; the backward adds the source gradient (with a patch) and the
    # vector gradient (with steering)
    assert len(fwd) == 2 * 3 * (1 + 2 * 2 * 2 * 4) == 198
    assert len(bwd) == 2 * (1 + 2 * 2) * (1 + 2 * 2 * 2 * 4 * 2) == 650
    assert len({cases.flag_label("bwd", f) for f in bwd}) == 650  # labels tell them apart
    entries = cases.enumerate_specializations((2048,), ("fp32",))
    by_kernel = {}
    for e in entries:
        by_kernel.setdefault(e["kernel"], []).append(e)
    # every combination is a distinct specialization of the launcher's own choosing
    assert len(by_kernel["_steer_fwd_kernel"]) == 198
    assert len(by_kernel["_steer_bwd_kernel"]) == 650
    assert set(by_kernel) == {"_steer_fwd_kernel", "_steer_bwd_kernel", "_patch_fwd_kernel",
                              "_patch_bwd_kernel", "_segment_sum_rows_kernel"}
    flags = {tuple(sorted((k, v) for k, v in e["kwargs"].items()
                          if k.startswith(("HAS_", "NEED_", "MODE"))))
             for e in by_kernel["_steer_bwd_kernel"]}
    assert len(flags) == 650
    for e in by_kernel["_steer_bwd_kernel"]:
        kw = e["kwargs"]
        assert kw["BLOCK_D"] <= config.MAX_SINGLE_PASS_BLOCK_BWD and kw["num_warps"] == 8
        if not kw["HAS_STEER"]:  # canonical: no steering, no steering flags
            assert not (kw["HAS_VIDX"] or kw["HAS_ALPHA"] or kw["HAS_MASK"] or kw["MODE"])
        assert kw["NEED_DALPHA"] == (kw["HAS_ALPHA"] and kw["HAS_STEER"])
    # the CI grid reaches single-pass and looped launches of both kernels
    ci = cases.enumerate_specializations(C.CI_D, ("fp32",))
    single = {(e["kernel"], e["kwargs"]["SINGLE_PASS"]) for e in ci
              if e["kernel"].startswith("_steer")}
    assert single == {(k, p) for k in ("_steer_fwd_kernel", "_steer_bwd_kernel")
                      for p in (True, False)}


def test_uses_local_memory_counts_a_bare_stack_frame():
    clean = dict(stack_bytes=0, local_bytes=0, spill_stores=0, spill_loads=0)
    assert not C.uses_local_memory(clean)
    for key in clean:
        assert C.uses_local_memory(dict(clean, **{key: 8}))


def test_byte_model():
    # forward: read + write a bf16 row block, plus the fp32 vector and per-row alphas
    assert KB.steer_bytes(4, 8, 2, 1, "fwd") == 2 * 4 * 8 * 2 + 8 * 4 + 4 * 4
    assert KB.steer_bytes(4, 8, 2, 3, "bwd") == 3 * 4 * 8 * 2 + 3 * 8 * 4 + 4 * 4 + 4 * 8
    assert KB.predicted_us(3e9, 3000.0) == pytest.approx(1000.0)
    # a 6 KB launch is not 0.002 us: one launch floor, two for forward + backward
    assert KB.predicted_us(6000, 3000.0) == KB.LAUNCH_FLOOR_US
    assert KB.predicted_us(6000, 3000.0, launches=2) == 2 * KB.LAUNCH_FLOOR_US
    rows = KB.predict((64,), (8192,), (1,), ("bf16",), ("fwd", "bwd", "fwdbwd"), 3000.0)
    assert [r["pass_"] for r in rows] == ["fwd", "bwd", "fwdbwd"]
    assert rows[2]["bytes"] == rows[0]["bytes"] + rows[1]["bytes"]
    assert rows[1]["launch"]["bwd"]["single_pass"] is False  # 8192 takes the looped backward
    assert rows[0]["launch"]["fwd"]["single_pass"] is True


def test_every_ci_specialization_compiles_for_sm90a_without_local_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "steerops.bench.compile_check", "--subset",
                           "ci", "--out", str(tmp_path), "--workers", "2", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=2400)
    report = json.loads((tmp_path / "compile_ci.json").read_text())
    s = report["summary"]
    assert s["failed"] == 0, [r for r in report["records"] if "error" in r][:3]
    local = [(r["kernel"], r["constexprs"], r["cases"][0]) for r in report["records"]
             if C.uses_local_memory(r)]
    assert local == []  # no stack frame, no local bytes, no STL/LDL anywhere
    assert s["specializations"] >= 3 * 198 + 2 * 650  # every flag combination at each D
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in report["records"]:
        c = r["constexprs"]
        if r["kernel"] == "_steer_bwd_kernel" and c["BLOCK_D"] <= 8192:
            # the backward up to the 70B-class width: <= 128 registers and 16+ warps
            # resident per SM (2 programs of 8 warps, or one of 16)
            assert r["registers"] <= 128 and r["programs_per_sm"] * r["num_warps"] >= 16, r
        assert r["vector128_accesses"] > 0, r  # 128-bit global accesses are emitted
