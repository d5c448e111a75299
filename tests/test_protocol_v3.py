"""docs/protocol.md v3's new measures on hand-built cases whose answers are known:
S_dead, R over every k, S1-proj-abs, the sign-flip split of S1-exact, the steered
sweeps in the cheapest form, the hierarchical bootstrap on synthetic runs of known
variance, the pricing of a hand-counted sweep, and the weight-hash record."""
import itertools
import json

import numpy as np
import pytest
import torch
import transformers as T

from steerops.bench import attribution as A
from steerops.bench import bootstrap as B
from steerops.bench import evaluate as E
from steerops.bench import faithfulness as F
from steerops.bench import methods as M
from steerops.bench import pricing as P
from steerops.bench import model_store
from helpers import toy_steering_case


# ----------------------------------------------------------------------------- S*

def test_dead_sites_are_the_last_layer_off_the_metric_and_positions_after_it():
    dead = F.dead_sites(3, 5)
    expected = np.zeros((3, 5), bool)
    expected[2, :4] = True                       # (L, p) for p != the answer position
    assert (dead == expected).all()
    # a metric read at position 2: positions after it are dead at every layer
    dead = F.dead_sites(3, 5, metric_positions=[2])
    expected = np.zeros((3, 5), bool)
    expected[2, [0, 1]] = True
    expected[:, 3:] = True
    assert (dead == expected).all()


def test_star_leaves_out_dead_sites_that_differ():
    rng = np.random.default_rng(0)
    n, L1, T, D = 4, 3, 6, 2
    diffs = np.zeros((n, L1, T, D))
    diffs[:, 0, 2] = rng.normal(size=(n, D))
    diffs[:, 1:, 2:] = rng.normal(size=(n, L1 - 1, T - 2, D))
    v2 = F.informative_sites(diffs, np.full(n, 2))
    v3 = F.star_sites(diffs, np.full(n, 2))
    # the last layer's sites before the answer differ, yet cannot reach the metric
    assert v2[2, 2:5].all() and not v3[2].any()
    assert (v3 == (v2 & ~F.dead_sites(L1, T))).all()
    assert v3.sum() == (T - 2)                   # layer 1 from p* on


# ----------------------------------------------------------------------------- R over all k

def test_R_is_the_mean_of_cap_over_every_k_up_to_half():
    g = np.array([4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.5])   # |S*| = 7: k = 1..4
    a = np.array([0.0, 5.0, 1.0, 4.0, 3.0, 0.1, 0.2])   # ranks sites 1, 3, 4, 2, ...
    cap = F.capture_all_k(a, g)
    best = np.array([4, 7, 9, 10], float)
    got = np.array([3, 3 + 1, 3 + 1 + 0, 3 + 1 + 0 + 2], float)
    assert cap == pytest.approx(got / best)
    assert F.R_all_k(a, g) == pytest.approx(np.mean(got / best))
    assert F.k_max(7) == 4 and F.k_max(8) == 4 and F.k_max(1) == 1
    m = F.measures_v3(a, g)
    assert m["R"] == pytest.approx(np.mean(got / best)) and len(m["cap"]) == 4
    assert m["R_grid"] == pytest.approx(np.mean([F.capture_v2(a, g, f) for f in F.K_FRACTIONS]))


def _brute(a, g, k):
    total, count = 0.0, 0
    for perm in itertools.permutations(range(len(a))):
        order = sorted(perm, key=lambda i: -a[i])
        total += sum(g[i] for i in order[:k])
        count += 1
    return total / count


def test_top_sums_break_ties_by_expectation_for_every_k():
    a = np.array([2.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    g = np.array([0.5, 1.0, 0.0, 0.2, 0.3, 0.9])
    assert F.expected_top_sums(a, g, 6) == pytest.approx([_brute(a, g, k) for k in range(1, 7)])
    # all scores tied: the random ranking's expectation, k mean(g)
    assert F.capture_all_k(np.zeros(6), g) == pytest.approx(F.random_capture_all_k(g))
    assert F.random_measures_v3(g)["R"] == pytest.approx(
        np.mean([k * g.mean() / np.sort(g)[::-1][:k].sum() for k in (1, 2, 3)]))


# ----------------------------------------------------------------------------- readings

def test_proj_abs_keeps_magnitudes_that_cancel_in_the_signed_mean():
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0]])             # (L+1, D), ||v_1|| = 2
    diffs = torch.zeros(2, 2, 1, 2)
    diffs[0, 1, 0] = torch.tensor([3.0, 1.0])
    diffs[1, 1, 0] = torch.tensor([-3.0, 5.0])             # the opposite projection
    assert M.projection(diffs, v).mean(0)[1, 0] == pytest.approx(0.0)
    assert M.projection_abs(diffs, v).mean(0)[1, 0] == pytest.approx(6.0)


def test_even_share_splits_the_steering_effect_by_sign():
    star = np.array([[False, True, True]])
    plus = torch.tensor([[[9.0, 1.0, 3.0]], [[9.0, 3.0, 1.0]]])    # m(+a v) - m(corrupt)
    minus = torch.tensor([[[9.0, 1.0, -1.0]], [[9.0, 3.0, -3.0]]])  # m(-a v) - m(corrupt)
    # odd (e+ - e-)/2: 0, 2, 0, 2 -> E|odd| = 1; even (e+ + e-)/2: 1, 1, 3, -1 -> E|even| = 1.5
    assert E.even_share(plus, minus, star) == pytest.approx(1.5 / 2.5)
    assert E.even_share(plus, -plus, star) == 0.0          # a purely directional effect
    assert E.even_share(plus, plus, star) == 1.0           # both signs do the same


def test_steered_sweeps_in_the_cheapest_form_equal_plain_steered_forwards():
    model, task, pairs, vectors, sites = toy_steering_case("ioi", pairs=5)
    sites[1, 2:] = True
    sites[2, 5] = True
    alphas = [1.0, 0.5, 2.0]
    acts = E.steerops.cache_activations(model, pairs.corrupt).acts.float()
    out, work = M.steered_sweeps(model, pairs, acts, {"plus": vectors, "minus": -vectors},
                                 alphas, sites, "cpu")
    for name, sign in (("plus", 1), ("minus", -1)):
        ref = M.steered_effects(model, pairs, sign * vectors, alphas, sites, "cpu")
        assert torch.equal(ref.isnan(), out[name].isnan())
        assert torch.allclose(ref, out[name], atol=1e-5, equal_nan=True)
    # one base run for both signs; blocks before the site skipped (layer 2: 1 of 2 blocks)
    assert work["base_rows"] == 5
    full = 5 * 2 * (sites.sum() + sites[1].sum()) * task.seq_len * 2
    assert work["token_layers_run"] < full / 2


def test_alpha_grid_in_the_cheapest_form_equals_the_plain_table():
    model, task, val, v, _ = toy_steering_case("induction", pairs=6, seed=4)
    val.contrast[:3] = 3                                   # two groups of p*
    base = M.base_metrics(model, val, "cpu")
    acts = E.steerops.cache_activations(model, val.corrupt).acts.float()
    table, work = M.val_recovery_table_reuse(model, val, acts, v, "cpu", base)
    assert table == pytest.approx(M.val_recovery_table(model, val, v, "cpu", base=base),
                                  abs=1e-5)
    assert work["base_rows"] == 6                          # one base run per pair


# ----------------------------------------------------------------------------- bootstrap

def _synthetic_runs(rng, seeds, splits, within, sd_seed, sd_split, sd_within, mean=0.5):
    runs = []
    for s in range(seeds):
        a = rng.normal(0, sd_seed)
        for k in range(splits):
            value = mean + a + rng.normal(0, sd_split)
            draws = value + rng.normal(0, sd_within, within)
            runs.append({"train_seed": s, "split_seed": k, "value": value,
                         "bootstrap": {"x": draws.tolist()}})
    return runs


def test_hierarchical_bootstrap_recovers_a_known_variance():
    rng = np.random.default_rng(0)
    S, K = 40, 8
    runs = _synthetic_runs(rng, S, K, 60, sd_seed=0.1, sd_split=0.05, sd_within=0.05)
    draws = B.task_draws(runs, ["x"], 2000, seed=1)["x"]
    expected = np.sqrt(0.1 ** 2 / S + 0.05 ** 2 / (S * K) + 0.05 ** 2 / (S * K))
    assert draws.std() == pytest.approx(expected, rel=0.25)
    # without the training-seed level the spread is an order of magnitude smaller:
    # what v2's interval (eval pairs and fits only) left out
    flat = [dict(r, train_seed=0) for r in runs]
    one_seed = B.task_draws(flat, ["x"], 2000, seed=1)["x"]
    assert one_seed.std() < expected / 2
    point = np.mean([r["value"] for r in runs])
    out = B.interval(draws, point)
    assert out["ci95"][0] < point < out["ci95"][1] and abs(out["bias"]) < 0.01
    assert out["outside"] is False


def test_interval_flags_a_point_outside_and_reports_the_bias():
    out = B.interval(np.linspace(0.3, 0.4, 101), 0.2)
    assert out["outside"] is True and out["bias"] == pytest.approx(0.15)
    assert B.interval([], 0.2)["ci95"] == [None, None]


def test_headline_draws_average_tasks_and_skip_undefined_ones():
    a, b = np.array([0.2, 0.4, np.nan]), np.array([0.6, 0.8, 1.0])
    assert B.combine([a, b]) == pytest.approx([0.4, 0.6, 1.0])


# ----------------------------------------------------------------------------- pricing

def _tiny_llama():
    return T.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=10)


def test_floor_counts_only_differing_sites_by_hand():
    cfg = _tiny_llama()
    # one layer over 4 tokens (2 x multiply-adds): q, k, v, o projections, gated MLP,
    # attention scores and weighted sum
    layer = 2 * 4 * 8 * 8 + 2 * 2 * 4 * 8 * 8 + 2 * 4 * 8 * 8 + 3 * 2 * 4 * 8 * 16 + 4 * 16 * 8
    assert layer == 5632
    token_layer = layer / 4
    head = 2 * 8 * 10
    base = 2 * (2 * layer + head)                     # clean and corrupt, head at the answer
    # pair 0 differs at (1, 2) and (2, 3); pair 1 only at (1, 3)
    diffs = torch.zeros(2, 3, 4, 1)
    diffs[0, 1, 2] = diffs[0, 2, 3] = diffs[1, 1, 3] = 1.0
    star = np.zeros((3, 4), bool)
    star[1, 2:] = star[2, 3] = True
    differing = E.differing_sites(diffs, star)
    assert differing == [[(1, 2), (2, 3)], [(1, 3)]]
    forms = P.patching_forms(cfg, 4, differing, all_sites=12)
    by_hand = (base + (1 * 2 * token_layer + head) + (0 + head)) + (base + 1 * 1 * token_layer
                                                                   + head)
    assert forms["floor"] == pytest.approx(by_hand)
    assert forms["naive_batched"] == pytest.approx(2 * (base + 12 * (2 * layer + head)))
    assert forms["prefix_reuse"] == pytest.approx(
        2 * base + (2 * 2 * token_layer + head) + (2 * 1 * token_layer + head)
        + (2 * 1 * token_layer + head))


def test_method_costs_count_and_amortise_the_fit():
    stages = {s: 1.0 for s in ("fit_caches", "eval_clean_cache", "eval_corrupt_cache",
                               "eval_grads", "val_table", "exact_sweep",
                               "exact_sweep_negative", "exact_sweep_randvec", "s2_optimise")}
    stages["fit_caches"] = 4.0
    costs = P.method_costs(stages, {"floor": 10.0, "naive_batched": 100.0})
    assert costs["S1-proj"]["flops"] == 6.0 and costs["S1-proj"]["flops_amortised"] == 2.0
    assert costs["S1-proj"]["ratio"] == {"floor": 0.6, "naive_batched": 0.06}
    assert costs["AtP"]["flops"] == costs["AtP"]["flops_amortised"] == 2.0
    # the random-direction controls pay for the fit they use (||v_l||, alpha_l)
    assert costs["S1-exact-randvec"]["flops"] == costs["S1-exact"]["flops"]


# ----------------------------------------------------------------------------- weights

def test_models_seen_say_whether_the_weights_are_the_committed_ones():
    def run(task, seed, sha):
        return {"task": task, "train_seed": seed, "informative_sites": 30,
                "model": {"held_out_accuracy": 1.0, "train_steps": 5, "seed": seed,
                          "config": {}, "weights_sha256": sha}}
    runs = [run("ioi", 0, "a" * 64), run("ioi", 0, "a" * 64), run("ioi", 1, "b" * 64),
            run("sorting", 0, "c" * 64)]
    seen = A.models_seen(runs, "standard", committed={("ioi", 0): "a" * 64,
                                                      ("ioi", 1): "f" * 64})
    assert [(m["task"], m["train_seed"], m["matches"]) for m in seen] == [
        ("ioi", 0, True), ("ioi", 1, False), ("sorting", 0, None)]
    assert seen[0]["informative_sites"] == [30, 30] and "config" not in seen[0]


def test_a_rerun_into_the_committed_folder_compares_with_the_file_it_overwrites(
        tmp_path, monkeypatch):
    # the run writes results.json before it records its models: the committed hashes
    # must be read first, or every model reads "n/a"
    committed = tmp_path / "results.json"
    real = model_store.weights_sha256(model_store.checkpoint_path("successor"))
    committed.write_text(json.dumps({"settings": {"scale": "toy"}, "models": [
        {"task": "successor", "train_seed": 0, "weights_sha256": real},
        {"task": "pronoun", "train_seed": 0, "weights_sha256": "0" * 64}]}))
    from steerops.bench import run_store
    monkeypatch.setattr(run_store, "COMMITTED", str(committed))
    settings = dict(scale="toy", n_fit=8, n_val=4, n_eval=6, s2_steps=2, n_boot=8,
                    n_boot_hier=40, repeats=0, split_seeds=1, realistic_pairs=1,
                    realistic_pairs_1b=0)
    results, table = A.run(["successor", "pronoun"], out_dir=str(tmp_path), progress=False,
                           with_realistic=False, settings=settings)
    assert {m["task"]: m["matches"] for m in results["models"]} == {
        "successor": True, "pronoun": False}
    assert "1 task model(s) differ from the committed results' weights" in table


def test_checkpoints_carry_their_weight_hash(tmp_path):
    model, info = model_store.load_checkpoint("successor")
    path = model_store.checkpoint_path("successor")
    assert info["weights_sha256"] == model_store.weights_sha256(path) and len(
        info["weights_sha256"]) == 64


# ----------------------------------------------------------------------------- memory

def test_stage_memory_is_read_outside_the_flop_counter():
    # under FlopCounterMode's dispatch mode the profiler reads an optimisation's peak
    # higher than the same work alone (S2: 550 MB vs 87 MB on a counting model)
    from steerops.bench.compute import Ledger
    from steerops.bench.memory import profiled_peak_mb
    model, task, fit, _, _ = toy_steering_case("ioi", pairs=8)
    init = torch.randn(model.config.hidden_size)

    def s2():
        return M.optimise_s2(model, fit, 1, 2.0, init, 3, "cpu")

    # torch 2.13 reads 1.30 MB under the counter and 0.99 MB alone, the same every run;
    # torch 2.10's profiler reads the stage alone at 1.07-1.13 MB from run to run. The
    # ledger must give the reading alone: within 10% of it, well short of the counter's
    alone = profiled_peak_mb(s2)[1]
    ledger = Ledger(model.config)
    ledger.run("s2", s2, sequences=8 * 3, tokens=task.seq_len, backward=True, repeats=0)
    ledger.run("s2 unread", s2, sequences=8 * 3, tokens=task.seq_len, repeats=0, memory=False)
    first, second = ledger.stages
    assert first.peak_memory_mb == pytest.approx(alone, rel=0.1)
    assert first.counted_flops > 0 and second.peak_memory_mb is None


def test_profiled_peak_sees_a_known_allocation_even_when_memory_is_reused():
    from steerops.bench.memory import profiled_peak_mb

    def work():
        a = torch.empty(4 * 2 ** 20, dtype=torch.uint8)   # 4 MiB, then freed
        del a
        b = torch.empty(2 * 2 ** 20, dtype=torch.uint8)   # 2 MiB live with the next
        c = torch.empty(3 * 2 ** 20, dtype=torch.uint8)   # 3 MiB: peak 5 MiB
        return b.numel() + c.numel()
    for _ in range(2):  # the second time the allocator reuses what it holds
        n, peak = profiled_peak_mb(work)
        assert n == 5 * 2 ** 20 and peak == pytest.approx(5.0, abs=0.05)
