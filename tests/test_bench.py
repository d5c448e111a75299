"""The attribution benchmark: task generators, faithfulness measures on
hand-made cases, compute accounting, training, and a small end-to-end run."""
import json
import math
import os

import numpy as np
import pytest
import torch

from steerops.bench import attribution as A
from steerops.bench import faithfulness as F
from steerops.bench.methods import METHODS
from steerops.bench.tasks import TASKS
from steerops.bench.model_store import load_checkpoint
from steerops.bench.train import accuracy, train_task

BINARY = {"greater_than", "brackets", "pronoun", "agreement"}


@pytest.mark.parametrize("name", list(TASKS))
def test_task_pairs_are_aligned_and_follow_the_rule(name):
    task = TASKS[name]
    p = task.sample(300, torch.Generator().manual_seed(3))
    assert p.clean.shape == p.corrupt.shape == (300, task.seq_len)
    diff = p.clean != p.corrupt
    assert (diff.sum(1) == 1).all()  # one symmetric token replacement
    assert diff[torch.arange(300), p.contrast].all()
    assert (p.answer != p.wrong).all()
    for i in range(300):
        assert task.rule(p.clean[i]) == int(p.answer[i])
        assert task.rule(p.corrupt[i]) == int(p.wrong[i])
    assert task.binary == (name in BINARY)
    if task.binary:  # oriented: every clean prompt holds the same value of the variable
        assert p.answer.unique().numel() == 1 and p.wrong.unique().numel() == 1
    else:
        assert p.answer.unique().numel() > 2
    same_seed = task.sample(300, torch.Generator().manual_seed(3))
    assert torch.equal(same_seed.clean, p.clean)


def test_capture_on_hand_made_sites():
    g = np.array([5.0, 3.0, 1.0, 0.0, -1.0] + [0.0] * 95)  # 100 sites
    perfect = g.copy()
    assert F.capture(perfect, g, 0.01) == 1.0
    assert F.faithfulness_R(perfect, g) == 1.0
    second = np.zeros(100)
    second[1] = 10.0  # top-1 picks the site worth 3 of 5
    assert F.capture(second, g, 0.01) == pytest.approx(3 / 5)
    worst = -g
    assert F.capture(worst, g, 0.01) == pytest.approx(-1 / 5)  # the harmful site comes first
    # top 2%: 2 sites, best sum 8
    assert F.capture(np.arange(100.0), g, 0.02) == pytest.approx(0 / 8)
    assert F.top_k_count(100, 0.5) == 50 and F.top_k_count(7, 0.01) == 1


def test_random_expectation_and_chance_correction():
    rng = np.random.default_rng(0)
    g = rng.normal(size=40)
    exact = F.expected_random_capture(g, 0.1)
    sims = np.mean([F.capture(rng.normal(size=40), g, 0.1) for _ in range(20000)])
    assert sims == pytest.approx(exact, abs=0.03)
    assert F.chance_corrected(1.0, 0.3) == 1.0
    assert F.chance_corrected(0.3, 0.3) == 0.0
    assert F.chance_corrected(0.65, 0.3) == pytest.approx(0.5)


def test_spearman_and_recall():
    x = np.arange(10.0)
    assert F.spearman(x, x ** 3) == pytest.approx(1.0)
    assert F.spearman(x, -x) == pytest.approx(-1.0)
    # ties take the average rank: [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 0.9486...
    assert F.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    g = np.arange(20.0)
    assert F.top_recall(g, g, 0.1) == 1.0
    assert F.top_recall(-g, g, 0.1) == 0.0


def test_recovery_ratio_of_means():
    assert F.recovery([3.0, 5.0], [10.0, 10.0], [0.0, 0.0]) == pytest.approx(0.4)
    assert F.recovery([1.0], [2.0], [0.0]) == 0.5
    assert math.isnan(F.recovery([1.0], [1.0], [1.0]))


def test_bootstrap_interval_contains_the_statistic():
    values = np.random.default_rng(1).normal(2.0, 1.0, size=200)
    lo, hi = F.bootstrap_interval(lambda idx: values[idx].mean(), 200, n_boot=300)
    assert lo < values.mean() < hi and hi - lo < 0.6


@pytest.mark.parametrize("name", list(TASKS))
def test_shipped_checkpoints_reach_95_percent(name):
    model, info = load_checkpoint(name)
    assert info["held_out_accuracy"] >= 0.95
    assert accuracy(model, TASKS[name], 200, seed=987) >= 0.95  # fresh prompts


def test_training_is_reproducible():
    a, info_a = train_task(TASKS["successor"], seed=0, max_steps=15, eval_every=1000,
                           progress=False)
    b, _ = train_task(TASKS["successor"], seed=0, max_steps=15, eval_every=1000,
                      progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert info_a["steps"] == 15


TINY = dict(scale="toy", n_fit=8, n_val=4, n_eval=6, s2_steps=2, n_boot=10, n_boot_hier=50,
            repeats=1, split_seeds=1, realistic_pairs=1, realistic_pairs_1b=0)


def test_end_to_end_small_run(tmp_path):
    results, table = A.run(["successor", "pronoun"], out_dir=str(tmp_path), progress=False,
                           with_realistic=False, settings=TINY)
    data = json.loads((tmp_path / "results.json").read_text())
    assert sorted(data["tasks"]) == ["pronoun", "successor"]
    assert data["complete"] is True and data["stages_done"][-1] == "curves"
    assert data["protocol"] == {"version": 4, "document": "docs/protocol.md"}
    for key in ("device", "torch", "triton", "transformers", "commit", "torch_threads"):
        assert key in data["environment"]
    # the report opens with the verdict: every reading, R with its interval, both forms
    assert table.index("## Verdict") < table.index("## Methods, all tasks")
    for m in ("S1-proj", "S1-proj-abs", "S1-exact-odd", "S1-proj-abs-randvec"):
        assert f"\n| {m} | " in table
    rows = {r["method"]: r for r in data["verdict"]["all"]}
    assert 0 < rows["S1-proj"]["ratio_floor"] and 0 < rows["S1-proj"]["ratio_naive_batched"]
    assert rows["S1-proj"]["ratio_amortised_floor"] < rows["S1-proj"]["ratio_floor"]
    # toy models: no task reaches |S*| >= 10, and the report says so
    assert data["headline_rule_met"] is False and "No task reaches |S*| >= 10" in table
    for png in ("plane.png", "cap_curves.png", "compute_ratio.png", "heatmaps/successor.png",
                "heatmaps/pronoun.png"):
        assert os.path.getsize(tmp_path / png) > 1000
    assert set(data["families"]) == {"all", "consistent", "symmetric"}
    assert "runs" not in data  # compact: the per-run records stay in the shards
    for m in data["models"]:
        assert len(m["weights_sha256"]) == 64 and m["matches"] is None
    for r in results["runs"]:
        n_star = r["informative_sites"]
        for m in METHODS:
            assert len(r["methods"][m]["abs"]["cap"]) == F.k_max(n_star)
            assert len(r["bootstrap"][m]) == TINY["n_boot"]
        assert np.asarray(r["effects"]).shape == (3, TASKS[r["task"]].seq_len)


def test_kernel_benchmark_refuses_without_a_gpu_or_under_the_interpreter(capsys):
    from steerops.bench import kernels
    assert kernels.refuse_reason() is not None  # CI: interpreter on, no CUDA
    assert kernels.main(["--quick"]) == 2
    assert "refusing" in capsys.readouterr().err


def test_kernel_benchmark_providers_run_and_count_bytes(monkeypatch):
    """The GPU suite's provider logic, exercised on CPU tensors (no timing)."""
    from steerops.bench import kernels
    monkeypatch.setattr(kernels, "DEVICE", "cpu")
    fake_bench = lambda fn: (fn(), 0.5)[1]  # noqa: E731  (ms)
    rows = []
    for which in ("fwd", "bwd", "fwdbwd"):
        providers, nbytes = kernels.steer_cases(8, 16, torch.float32, "norm_scaled", 3, which)
        assert set(providers) == {"steerops", "steerops_unchecked", "eager", "compile"} | (
            {"steerops_launch"} if which == "fwd" else {"steerops_pipelined"} | (
                {"steerops_launch"} if which == "bwd" else set()))
        rows += kernels._measure(fake_bench, providers, nbytes, 100.0, op="steer",
                                 mode="norm_scaled", pass_=which, dtype="fp32", N=8, D=16, K=3)
    # the pipelined provider launches at 2 row stages and leaves the default as it was
    from steerops.kernels import config
    default = config.BWD_ROW_STAGES
    assert kernels._with_bwd_row_stages(lambda: config.BWD_ROW_STAGES, 2)() == 2
    assert config.BWD_ROW_STAGES == default == 1
    providers, nbytes = kernels.patch_cases(16, 16, 4, torch.float32)
    assert nbytes == 2 * 4 * 16 * 4 + 2 * 4 * 8
    rows += kernels._measure(fake_bench, providers, nbytes, 100.0, op="patch_", mode="full",
                             pass_="fwd", dtype="fp32", N=16, D=16, M=4)
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    fwd = rows[0]
    assert fwd["bytes"] == 2 * 8 * 16 * 4 + 3 * 16 * 4 + 8 * 4 + 8 * 8
    assert fwd["GBps"] == pytest.approx(fwd["bytes"] / 0.5e-3 / 1e9)
    from steerops.bench.kernels_report import markdown
    table = markdown({"device": "cpu-test", "driver": None, "torch": "x", "triton": "y",
                      "commit": None, "copy_GBps": 100.0, "rows": rows})
    assert table.count("\n| steer |") == 5 + 6 + 5 and table.count("| patch_ |") == 4


def test_kernel_benchmark_compiles_every_case_for_itself(monkeypatch):
    """Each case's eager function shares one code object; past dynamo's recompile limit
    the "compile" provider would time uncompiled code unless each case starts afresh."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from steerops.bench import kernels
    monkeypatch.setattr(kernels, "DEVICE", "cpu")
    config = torch._dynamo.config
    monkeypatch.setattr(config, "recompile_limit" if hasattr(config, "recompile_limit")
                        else "cache_size_limit", 1)
    before = counters["stats"]["unique_graphs"]
    for N in (3, 5, 7):
        providers, _ = kernels.steer_cases(N, 16, torch.float32, "add", 1, "fwd")
        providers["compile"]()
    assert counters["stats"]["unique_graphs"] - before == 3


def test_realistic_stage_prices_and_times_every_method():
    """GPT-2-small / 1.1B: every method priced by the benchmark's rules (FLOPs with fake
    tensors on every transformers release), the benchmark's own run timed on GPT-2-small,
    at a tiny size."""
    from steerops.bench.pricing import METHOD_STAGES
    out = A.realistic(dict(TINY, realistic_pairs=1, realistic_pairs_1b=0), "cpu",
                      progress=False, T=4, contrast=1)
    for name, layers in (("gpt2-small", 12), ("llama-1.1b", 22)):
        r = out[name]
        assert r["star_sites"] == (layers - 1) * 3
        # counted and analytic forward FLOPs agree within 25%
        assert abs(r["forward_flops_meta"] / r["analytic_forward_flops"] - 1) < 0.25
        assert set(r["methods"]) == set(METHOD_STAGES)
        forms = r["patching_flops"]
        assert forms["floor"] < forms["prefix_reuse"] < forms["naive_batched"]
        s1 = r["methods"]["S1-proj"]
        assert 0 < s1["ratio"]["naive_batched"] < s1["ratio"]["floor"]
        assert s1["ratio_amortised"]["floor"] < s1["ratio"]["floor"]
    m = out["gpt2-small"]["measured"]
    assert m["pairs"] == 1 and m["methods"]["patching"]["seconds"] > 0
    assert all(m["methods"][k]["ratio_seconds"] > 0 for k in ("S1-proj", "S1-exact", "S2"))
    assert {s["name"] for s in m["stages"]} >= {"patching", "val_table", "exact_sweep"}
    assert out["llama-1.1b"]["measured"] is None


def test_results_are_written_after_each_stage(tmp_path, monkeypatch):
    """A failure late in the run (here the realistic stage) loses nothing before it."""
    def boom(*args, **kwargs):
        raise RuntimeError("realistic stage failed")
    monkeypatch.setattr(A, "realistic", boom)
    with pytest.raises(RuntimeError, match="realistic stage failed"):
        A.run(["successor"], out_dir=str(tmp_path), progress=False, settings=TINY)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is False
    assert data["stages_done"] == ["runs", "curves"]
    assert "successor" in data["tasks"] and "curves" in data


def test_commit_named_by_steerops_commit_wins(monkeypatch):
    """A copy of the tree sent to a GPU machine has no git checkout of its own, or a stale
    one: results name the commit the sender gave in STEEROPS_COMMIT; without it and
    without git, none, never a wrong one."""
    from steerops.bench import provenance

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.delenv("STEEROPS_COMMIT", raising=False)
    here = provenance.git_commit()
    assert here and here.split("+")[0] != "abc1234"
    monkeypatch.setenv("STEEROPS_COMMIT", "abc1234")
    assert provenance.git_commit() == "abc1234"
    monkeypatch.setattr(provenance.subprocess, "check_output", no_git)
    assert provenance.git_commit() == "abc1234"
    monkeypatch.delenv("STEEROPS_COMMIT")
    assert provenance.git_commit() is None


def test_op_call_breakdown_times_every_variant_and_they_compute_the_op(tmp_path):
    """`steerops bench overhead --op-call`: every way of calling the op (eager, launch,
    validation, validated, unchecked) is timed, in interleaved rounds, and saved."""
    from steerops.bench import overhead
    r = overhead.op_call_cost(N=3, D=7, calls=4, repeats=2)
    assert list(r["us_per_call"]) == ["eager", "launch", "validation", "validated", "unchecked"]
    assert all(len(t) == 2 and all(x > 0 for x in t) for t in r["us_per_call"].values())
    table = overhead.op_call_markdown([r])
    assert "| 3 x 7 | norm_scaled | float32 |" in table
    out = overhead.main(["--op-call", "--device", "cpu", "--calls", "3", "--out", str(tmp_path)])
    assert out["op_call"][0]["N"] == 64 and (tmp_path / "op_call.json").exists()
