"""docs/protocol.md v4 on hand-built cases whose answers are known: the positional
priors, R_pair by hand, paired differences of a reading identical to its twin, the
verdict rule's conditions, nested split seeds, twin seeds per run, and the benchmark
end to end (every v4 field, compressed shards, --report-only rebuilding results.json
byte for byte)."""
import json
import os

import numpy as np
import pytest
import torch

from steerops.bench import attribution as A
from steerops.bench import bootstrap as B
from steerops.bench import controls as C
from steerops.bench import faithfulness as F
from steerops.bench import headline as H
from steerops.bench import reporting
from steerops.bench.provenance import read_shard


# ----------------------------------------------------------------------------- priors

def test_prior_answer_scores_1_on_a_map_that_sits_in_the_answer_column_later_layers_first():
    L1, T = 5, 7
    g = np.full((L1, T), 0.001)
    g[:, T - 1] = np.arange(L1) + 1.0            # the answer column, rising with depth
    star = np.ones((L1, T), bool)
    star[L1 - 1, T - 1] = False                  # S_end
    prior = C.prior_answer(L1, T)
    assert F.R_all_k(np.abs(prior[star]), g[star]) == pytest.approx(1.0)
    # per pair, through R_pair: every pair's own map is that map
    n = 3
    R = C.pair_R(np.broadcast_to(prior, (n, L1, T)), np.broadcast_to(g, (n, L1, T)),
                 np.broadcast_to(star, (n, L1, T)))
    assert R == pytest.approx([1.0] * n)
    # the answer column ranks first, later layers first, then the rest
    assert prior[L1 - 1, T - 1] > prior[0, T - 1] > prior[L1 - 1, 0] > prior[0, 0]


def test_prior_path_ranks_the_answer_column_then_each_pairs_contrast_column():
    L1, T = 3, 6
    p = C.prior_path(L1, T, contrast=[1, 4])
    assert p.shape == (2, L1, T)
    for i, c in enumerate((1, 4)):
        order = np.argsort(-p[i].ravel(), kind="stable")
        cols = [int(k % T) for k in order]
        layers = [int(k // T) for k in order]
        assert cols[:L1] == [T - 1] * L1 and cols[L1:2 * L1] == [c] * L1
        assert layers[:L1] == [2, 1, 0] and layers[L1:2 * L1] == [2, 1, 0]


# ----------------------------------------------------------------------------- R_pair

def test_R_pair_by_hand_on_two_pairs():
    # pair 0: 3 differing sites, g = (3, 1, 0), scores rank (2nd, 1st, 3rd)
    # pair 1: 2 differing sites (the third identical on that pair), g = (0, 2), scores right
    raw = np.array([[[3.0, 1.0, 0.0]], [[0.0, 2.0, 9.0]]])   # (n, L+1=1, T=3): patched metric
    m_clean, m_corrupt = np.array([1.0, 1.0]), np.array([0.0, 0.0])
    g = C.pair_effects(raw, m_clean, m_corrupt)
    diffs = np.ones((2, 1, 3, 2))
    diffs[1, 0, 2] = 0.0                                        # identical on pair 1
    stars = C.pair_star(diffs, np.ones((1, 3), bool))
    assert stars[0].sum() == 3 and stars[1].sum() == 2
    scores = np.array([[[0.5, 0.9, 0.1]], [[0.1, 0.7, 5.0]]])
    R = C.pair_R(scores, g, stars)
    # pair 0: k = 1..2; Cap(1) = g(site 1) / 3 = 1/3; Cap(2) = (1 + 3) / (3 + 1) = 1
    # pair 1: k = 1; Cap(1) = 2 / 2 = 1 (site 2 is not in its S*, whatever its score)
    assert R == pytest.approx([(1 / 3 + 1) / 2, 1.0])
    assert C.mean_of(R) == pytest.approx(((1 / 3 + 1) / 2 + 1) / 2)


def test_shares_of_the_answer_column_and_the_top_3():
    g = np.zeros((3, 4))
    g[:, 3] = [1.0, 2.0, 0.0]
    g[1, 1], g[0, 0], g[2, 2] = 4.0, -2.0, 1.0
    star = np.ones((3, 4), bool)
    s = C.shares(g, star)
    total = 1 + 2 + 4 + 2 + 1
    assert s["answer_column_share"] == pytest.approx(3 / total)
    assert s["top3_share"] == pytest.approx((4 + 2 + 2) / total)


# ----------------------------------------------------------------------------- differences

def _runs(n_runs=6, n_boot=50, seed=0, twin_equal=True):
    """Synthetic runs over 2 training seeds: every row's within-run draws, S1-lin equal to
    its twin draw by draw (or 0.2 above it)."""
    rng = np.random.default_rng(seed)
    runs = []
    for i in range(n_runs):
        draws = {k: rng.uniform(0.3, 0.9, n_boot) for k in H.keys()}
        draws[H.PAIR + "S1-lin~twin"] = draws[H.PAIR + "S1-lin"] - (0 if twin_equal else 0.2)
        R_pair = {k[len(H.PAIR):]: float(np.mean(v)) for k, v in draws.items()}
        runs.append({"train_seed": i % 2, "bootstrap": {k: v.tolist() for k, v in draws.items()},
                     "v4": {"R_pair": R_pair, "R": dict(R_pair), "answer_column_share": 0.5,
                            "top3_share": 0.7},
                     "methods": {"random": {"abs": {"R": 0.5}}}})
    return runs


def test_a_reading_identical_to_its_twin_has_a_difference_interval_containing_0():
    runs = _runs()
    draws = B.task_draws(runs, H.keys(), 300, 0)
    t = H.task_v4(runs, draws)
    d = t["rows"]["S1-lin"]["vs_twin"]
    assert d["value"] == pytest.approx(0.0, abs=1e-12)
    assert d["ci95"][0] <= 0.0 <= d["ci95"][1]
    # 0.2 above its twin on every draw: the paired interval is [0.2, 0.2], far from 0,
    # even though the two rows' own intervals overlap
    t2 = H.task_v4(_runs(twin_equal=False), B.task_draws(_runs(twin_equal=False), H.keys(),
                                                          300, 0))
    d2 = t2["rows"]["S1-lin"]["vs_twin"]
    assert d2["ci95"] == pytest.approx([0.2, 0.2]) and d2["value"] == pytest.approx(0.2)
    lin, twin = t2["rows"]["S1-lin"], t2["rows"]["S1-lin~twin"]
    assert lin["ci95"][0] < twin["ci95"][1]


def _family(R_pair, twin_lo, prior_lo, ratio):
    row = {"R_pair": R_pair, "ci95": [R_pair - 0.01, R_pair + 0.01], "outside": False,
           "vs_twin": {"value": twin_lo + 0.01, "ci95": [twin_lo, twin_lo + 0.02]},
           "vs_prior": {"value": prior_lo + 0.01, "ci95": [prior_lo, prior_lo + 0.02]},
           "compute": {f"{k}_{f}": ratio for k in ("ratio", "ratio_amortised")
                       for f in H.FORMS}}
    rows = {m: dict(row) for m in H.READINGS + H.BASELINES}
    for m in H.BASELINES:  # a baseline has no twin (bench.headline.differences)
        rows[m].pop("vs_twin")
    return {"rows": rows}


@pytest.mark.parametrize("R_pair, twin_lo, prior_lo, ratio, fails", [
    (0.95, 0.01, 0.01, 0.03, []),
    (0.87, 0.01, 0.01, 0.03, ["R_pair < 0.88"]),
    (0.95, -0.01, 0.01, 0.03, ["does not beat its random twin"]),
    (0.95, 0.01, 0.0, 0.03, ["does not beat prior-answer"]),
    (0.95, 0.01, 0.01, 0.06, ["compute 0.060 > 0.05"]),
])
def test_the_verdict_holds_only_when_every_condition_does(R_pair, twin_lo, prior_lo, ratio,
                                                           fails):
    rows = H.verdict(_family(R_pair, twin_lo, prior_lo, ratio))
    lin = next(r for r in rows if r["method"] == "S1-lin")
    assert lin["fails_ratio_floor"] == fails
    assert lin["holds_ratio_floor"] is (not fails)
    atp = next(r for r in rows if r["method"] == "AtP")   # no twin: never the paper's pair
    assert not atp["holds_ratio_floor"] and "no random twin" in " ".join(
        atp["fails_ratio_floor"])


def test_the_verdict_sentence_names_each_reading_and_form_it_holds_for():
    from steerops.bench.report_v4 import sentence
    rows = H.verdict(_family(0.95, 0.01, 0.01, 0.03))
    text = sentence({"verdict": {"all": rows}})[0]
    assert text.startswith("The paper's pair holds for: S1-proj (vs floor), ")
    assert "S1-lin (vs naive_batched), " in text and "AtP" not in text.split(".")[0]
    assert "(vs naive_batched). Steering readings whose R_pair beats" in text
    none = sentence({"verdict": {"all": H.verdict(_family(0.87, 0.01, 0.01, 0.03))}})[0]
    assert none.startswith("**The paper's pair holds for no reading")


def test_task_resampled_draws_mix_tasks():
    draws = {"a": np.zeros(400), "b": np.ones(400)}
    d = H.task_resampled(draws, 400, 0)
    assert set(np.unique(d)) <= {0.0, 0.5, 1.0} and 0.0 in d and 1.0 in d


# ----------------------------------------------------------------------------- seeds

def test_split_seeds_are_nested_and_distinct_per_model():
    settings = dict(A.FULL)
    seeds = {(t, s): A.split_seeds(t, s, settings) for t in ("ioi", "pronoun", "sorting")
             for s in (0, 1, 2)}
    flat = [x for v in seeds.values() for x in v]
    assert len(flat) == len(set(flat)) == 9 * settings["split_seeds"]
    assert A.split_seeds("ioi", 1, settings) == seeds[("ioi", 1)]   # deterministic


def test_twin_directions_are_per_run_with_the_readings_norms():
    v = torch.randn(4, 16)
    a = C.twin_directions(v, C.derived_seed("twin", "ioi", 0, 5))
    b = C.twin_directions(v, C.derived_seed("twin", "pronoun", 0, 5))
    assert len(a) == C.N_TWINS and not torch.equal(a[0], b[0])
    assert not torch.equal(a[0], a[1])
    for r in a:
        assert torch.allclose(r.norm(dim=-1), v.norm(dim=-1), rtol=1e-5)


# ----------------------------------------------------------------------------- end to end

TINY = dict(scale="toy", n_fit=8, n_val=4, n_eval=6, s2_steps=2, n_boot=8, n_boot_hier=40,
            repeats=0, split_seeds=1, realistic_pairs=0, realistic_pairs_1b=0)


def test_the_benchmark_writes_every_v4_field_and_report_only_rebuilds_it_exactly(tmp_path,
                                                                                monkeypatch):
    out = str(tmp_path / "bench")
    results, table = A.run(["successor", "pronoun"], out_dir=out, progress=False,
                           with_realistic=False, settings=TINY)
    v4 = results["v4"]
    assert results["protocol"]["version"] == 4
    assert set(v4) >= {"discriminative_tasks", "headline_basis", "families", "verdict"}
    for name, t in results["tasks"].items():
        assert 0 <= t["v4"]["answer_column_share"] <= 1 and 0 <= t["v4"]["top3_share"] <= 1
        for row in H.ROWS:
            assert np.isfinite(t["v4"]["rows"][row]["R_pair"]), (name, row)
        for m, twin in C.TWINS.items():
            assert "vs_twin" in t["v4"]["rows"][m] and "vs_prior" in t["v4"]["rows"][m]
    fam = v4["families"]["all"]["rows"]["S1-lin"]
    assert fam["ci95_tasks_resampled"][0] is not None
    row = next(r for r in v4["verdict"]["all"] if r["method"] == "S1-exact")
    assert row["forward_equivalents_per_pair"] > 0 and "fails_ratio_floor" in row
    be = results["break_even"]
    assert len(be["by_layers"]["S1-proj"]["floor"]) == len(be["layers"])
    assert "## Verdict (protocol v4)" in table and "outside their own 95% interval" in table
    # two of the scale's 12 tasks: the report says first that this is a subset
    assert "**Scope: a subset of the toy scale's run**: tasks successor, pronoun of " in table
    assert table.index("**Scope") < table.index("## Verdict")
    full = dict(results, scope=dict(results["scope"], tasks=results["scope"]["scale_tasks"]))
    assert reporting.scope_lines(full) == [] and "Scope" not in reporting.markdown(full)
    for png in ("plane.png", "answer_column_share.png", "break_even.png", "plane_v3.png"):
        assert os.path.getsize(os.path.join(out, png)) > 10_000
    # the shards are compressed and hold per-pair g and every reading's per-pair scores
    shard = A.shard_path(out, TINY, "pronoun", 0, A.split_seeds("pronoun", 0, TINY)[0])
    assert shard.endswith(".json.gz")
    with open(shard, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    run = read_shard(shard)
    # each shard says where it came from: device, versions, commit, settings, seeds, weights
    assert {"device", "torch", "transformers", "commit"} <= set(run["environment"])
    assert run["settings"]["n_eval"] == TINY["n_eval"] and run["protocol"] == 4
    assert run["twin_seed"] and run["split_seed"] and run["model"]["weights_sha256"]
    pp = run["v4"]["per_pair"]
    n, k = pp["pairs"], pp["star_sites"]
    assert len(pp["g"]) == n * k and len(pp["scores"]["S1-lin"]) == n * k
    # the first eval pair's tokens, drawn per pair over its prompt (heatmaps/TASK-pair.png)
    clean, corrupt = pp["example"]["clean"], pp["example"]["corrupt"]
    assert len(clean) == len(corrupt) == run["seq_len"]
    assert sum(c != x for c, x in zip(clean, corrupt)) >= 1
    assert os.path.getsize(os.path.join(out, "heatmaps", "pronoun-pair.png")) > 10_000
    # every reading's R_pair can be recomputed from the shard alone (to its 6 digits)
    g = np.array(pp["g"]).reshape(n, 1, k)
    stars = np.array(pp["pair_star"], bool).reshape(n, 1, k)
    for name in ("S1-lin", "S1-exact", "AtP"):
        a = np.array(pp["scores"][name]).reshape(n, 1, k)
        assert C.mean_of(C.pair_R(a, g, stars)) == pytest.approx(run["v4"]["R_pair"][name],
                                                                 abs=1e-4)
    # --report-only over the finished run: results.json and results.md byte for byte
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("results.json", "results.md")}
    # ... even after another commit's results became the committed ones: whether each model
    # was the committed one is as the run found it
    monkeypatch.setattr(A, "committed_hashes", lambda scale: {("successor", 0): "f" * 64})
    A.run(["successor", "pronoun"], out_dir=out, progress=False, with_realistic=False,
          settings=TINY, report_only=True)
    for f, data in before.items():
        assert open(os.path.join(out, f), "rb").read() == data, f
    assert json.loads(before["results.json"])["complete"]


def test_the_report_says_which_tasks_are_solved_in_the_answer_column():
    from steerops.bench.report_v4 import column_lines
    task = lambda family, share: {"family": family, "v4": {"answer_column_share": share}}  # noqa: E731
    tasks = {"ioi": task("consistent", 0.9999), "pronoun": task("symmetric", 0.125),
             "deep/var_chain": task("multihop", 0.93), "deep/pointer": task("multihop", 0.31)}
    text = column_lines({"tasks": tasks})[0]
    assert "ioi (1.000)" in text and "pronoun" not in text
    assert "not along the chain the prompt lays out: deep/var_chain (0.930)." in text
    assert "pointer" not in text
    del tasks["deep/var_chain"]
    assert "the prompt lays out: none." in column_lines({"tasks": tasks})[0]
    one_task = column_lines({"tasks": {"pronoun": tasks["pronoun"]}})[0]
    assert "no task" in one_task and "Multi-hop" not in one_task  # no multi-hop task: no line
