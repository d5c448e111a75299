"""docs/protocol.md measures (v2's, still reported beside v3's; v3's own in
test_protocol_v3.py) on hand-built cases whose answers are known, the method
family's pieces, the standard scale's tasks and training cache, and resumable runs."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

import steerops
from steerops.bench import aggregate as AG
from steerops.bench import headline as H
from steerops.bench import attribution as A
from steerops.bench import evaluate as E
from steerops.bench import faithfulness as F
from steerops.bench import methods as M
from steerops.bench import scales, train
from steerops.bench import model_store
from helpers import toy_steering_case
from steerops.bench.spread import FILLER0, MIN_AFTER_CONTRAST, VOCAB_STANDARD, task_at
from steerops.bench.tasks import FAMILIES, TASKS


# ----------------------------------------------------------------------------- S*

def test_informative_sites_drop_identical_and_endpoint_sites():
    rng = np.random.default_rng(0)
    n, L1, T, D = 5, 3, 6, 4
    diffs = np.zeros((n, L1, T, D))
    p_star = 2
    diffs[:, 0, p_star] = rng.normal(size=(n, D))        # the embedding differs only at p*
    diffs[:, 1:, p_star:] = rng.normal(size=(n, L1 - 1, T - p_star, D))
    diffs[:, 1, 4] = 0.0                                   # a site identical on every pair
    diffs[0, 2, 3] = 0.0                                   # identical on one pair only: kept
    star = F.informative_sites(diffs, np.full(n, p_star))
    expected = np.zeros((L1, T), bool)
    expected[1:, p_star:] = True
    expected[1, 4] = False                                 # S_0
    expected[L1 - 1, T - 1] = False                        # S_end: (L, last)
    assert not star[0].any()                               # (0, p*) is S_end, the rest S_0
    assert (star == expected).all()


# ----------------------------------------------------------------------------- ties

def _brute_expected_top(a, g, k):
    """Mean over every order of the tied scores of sum g over the top k."""
    total, count = 0.0, 0
    for perm in itertools.permutations(range(len(a))):
        order = sorted(perm, key=lambda i: -a[i])  # sorted() is stable: perm breaks ties
        total += sum(g[i] for i in order[:k])
        count += 1
    return total / count


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ties_are_broken_by_expectation(k):
    a = np.array([3.0, 1.0, 1.0, 1.0, 0.0])
    g = np.array([0.5, 1.0, 0.0, 0.2, 0.3])
    assert F.expected_top_sum(a, g, k) == pytest.approx(_brute_expected_top(a, g, k))
    # all scores tied = the random expectation
    flat = np.zeros(5)
    assert F.expected_top_sum(flat, g, 2) == pytest.approx(2 * g.mean())


def test_capture_ranks_by_magnitude_unless_signed():
    g = np.array([0.0, 0.9, 0.1, 0.0])
    a = np.array([0.2, -5.0, 0.1, 0.0])  # the big negative score is the right site
    assert F.measures(a, g)["cap"][0] == 1.0
    assert F.measures(a, g, signed=True)["cap"][0] == 0.0


def test_tied_method_scores_equal_random_expectation():
    g = np.random.default_rng(1).normal(size=50)
    assert F.measures(np.ones(50), g)["R"] == pytest.approx(F.random_R(g))


def test_top_recall_by_expectation():
    g = np.array([4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    a = np.zeros(10)
    assert F.expected_top_recall(a, g, 0.1) == pytest.approx(0.1)   # 1 of 10 tied sites
    assert F.expected_top_recall(g, g, 0.2) == 1.0


# ----------------------------------------------------------------------------- R'' and guard

def test_skill_over_norm_sign():
    assert F.skill(0.8, 0.5) == pytest.approx(0.6)
    assert F.skill(0.5, 0.5) == 0.0
    assert F.skill(0.3, 0.5) < 0          # worse than ranking by ||dh||
    assert math.isnan(F.skill(0.9, 1.0))  # no room above a perfect norm baseline
    g = np.array([0.0, 0.1, 0.9, 0.0])
    norm = np.array([0.0, 5.0, 1.0, 0.0])  # the norm baseline picks the wrong site first
    worse = np.array([9.0, 5.0, 1.0, 0.0])
    better = np.array([0.0, 0.1, 0.9, 0.0])
    R_norm = F.measures(norm, g)["R"]
    assert F.measures(worse, g, R_norm=R_norm)["R_skill"] < 0
    assert F.measures(better, g, R_norm=R_norm)["R_skill"] == pytest.approx(1.0)


def test_recovery_guard_never_divides_by_a_small_sum():
    assert F.guarded_recovery([0.5], [0.05]) is None        # sum g < 0.1: undefined
    assert F.guarded_recovery([0.0], [0.0]) is None          # never 0/0
    assert F.guarded_recovery([0.3, 0.1], [0.4, 0.4]) == pytest.approx(0.5)
    assert F.guarded_recovery([0.3], [-0.5]) is None         # negative sums are not recovery


def test_recovery_sets_use_g_top_sites_in_s_star():
    g = np.array([[0.0, 0.0, 0.0], [0.0, 0.6, 0.2], [0.0, 0.05, 0.9]])
    star = np.array([[False] * 3, [False, True, True], [False, True, False]])  # (2,2) excluded
    effect = np.array([[0.0] * 3, [0.0, 1.2, 0.2], [0.0, 0.0, 9.0]])
    rec = E.recovery_sets(g, star, effect, denominator=2.0)
    assert rec["top1"]["sites"] == [[1, 1]]
    assert rec["top1"]["ratio"] == pytest.approx((1.2 / 2.0) / 0.6)
    tiny = E.recovery_sets(np.where(star, 0.01, 0.0), star, effect, 2.0)
    assert tiny["top1"]["ratio"] is None and tiny["top5pct"]["ratio"] is None


# ----------------------------------------------------------------------------- methods

def test_s1_methods_on_a_hand_built_case():
    v_dir = torch.tensor([1.0, 0.0])
    fit_dp = torch.stack([torch.tensor([[2.0, 0.0], [4.0, 0.0]])] * 3)  # (3 pairs, 2 layers, D=2)
    v = M.fit_vectors(fit_dp)
    assert torch.allclose(v, torch.tensor([[2.0, 0.0], [4.0, 0.0]]))
    diffs = torch.zeros(1, 2, 3, 2)
    diffs[0, 1, 2] = torch.tensor([3.0, 7.0])
    grads = torch.zeros(1, 2, 3, 2)
    grads[0, 1, 2] = torch.tensor([0.5, 1.0])
    proj = M.projection(diffs, v)
    assert proj[0, 1, 2] == pytest.approx(3.0 * 4.0)          # (dh . u) ||v||
    assert M.linearised(diffs, grads, v)[0, 1, 2] == pytest.approx(3.0 * 0.5)
    assert M.atp(diffs, grads)[0, 1, 2] == pytest.approx(3 * 0.5 + 7 * 1.0)
    assert M.norm_scores(diffs)[0, 1, 2] == pytest.approx(math.hypot(3, 7))
    assert torch.equal(v_dir, v[0] / v[0].norm())


def test_class_vectors_need_enough_pairs_else_pooled():
    fit_dp = torch.cat([torch.ones(8, 1, 2), -torch.ones(3, 1, 2)])
    fit_answer = torch.tensor([5] * 8 + [6] * 3)
    vecs = M.class_vectors(fit_dp, fit_answer, torch.tensor([5, 6, 7]))
    assert torch.allclose(vecs[0], torch.ones(1, 2))              # class 5: 8 pairs
    pooled = fit_dp.mean(0)
    assert torch.allclose(vecs[1], pooled) and torch.allclose(vecs[2], pooled)


def test_random_vectors_keep_each_layer_norm():
    v = torch.randn(4, 16)
    r = M.random_vectors(v, torch.Generator().manual_seed(0))
    assert torch.allclose(r.norm(dim=-1), v.norm(dim=-1))
    assert not torch.allclose(r, v)


def test_alpha_choice_is_closest_to_full_recovery():
    table = np.array([[0.1, 0.5, 1.4], [0.2, 0.9, 3.0], [np.nan, 0.3, 0.6]])
    grid = (1.0, 2.0, 4.0)
    assert M.choose_alphas(table, grid) == [4.0, 2.0, 4.0]
    assert M.choose_layer_alpha(table, grid) == (1, 2.0)


def test_steered_effects_match_one_steered_forward():
    model, task, pairs, vectors, sites = toy_steering_case("ioi", pairs=3)
    sites[1, 4] = sites[2, 5] = True
    out = M.steered_effects(model, pairs, vectors, [1.0, 0.5, 2.0], sites, "cpu", max_rows=2)
    assert torch.isnan(out[:, 0]).all() and torch.isnan(out[:, 1, :4]).all()
    metric = steerops.logit_diff(pairs.answer, pairs.wrong)
    rows = torch.arange(3)
    with torch.no_grad():
        base = metric(model(pairs.corrupt).logits, rows)
        mask = torch.zeros_like(pairs.corrupt, dtype=torch.bool)
        mask[:, 4] = True
        with steerops.Steering(model, 1, vectors[1], 0.5, positions=mask):
            steered = metric(model(pairs.corrupt).logits, rows)
    assert torch.allclose(out[:, 1, 4].float(), (steered - base).float(), atol=1e-5)


def test_cache_gradients_give_atp():
    model, task, pairs, _, _ = toy_steering_case("ioi", pairs=4, seed=1)
    metric = steerops.logit_diff(pairs.answer, pairs.wrong)
    gc = steerops.cache_gradients(model, pairs.corrupt, metric)
    clean = steerops.cache_activations(model, pairs.clean).acts
    atp = steerops.attribution_patching(model, pairs.clean, pairs.corrupt, metric)
    assert torch.allclose(M.atp(clean - gc.acts, gc.grads), atp.raw, atol=1e-5)
    assert gc.acts.shape == gc.grads.shape == (4, 3, task.seq_len, model.config.hidden_size)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- aggregation

def _fake_run(task, train_seed, split_seed, R, draws, star=30):
    entry = {"R": R, "R_grid": R, "R_prime": 0, "R_skill": 0, "spearman": 0,
             "top10_recall": 0, "cap": [R] * F.k_max(star)}
    methods = {m: {"abs": entry, "signed": entry, "v2_R": 0.5} for m in M.METHODS}
    rec = {"ratio": None, "sum_g": 0.0}
    cost = {"ratio": {"floor": 0.5, "naive_batched": 0.05, "prefix_reuse": 0.3},
            "ratio_amortised": {"floor": 0.2, "naive_batched": 0.02, "prefix_reuse": 0.1},
            "ratio_counted_flops": 0.5, "ratio_seconds": 0.5, "peak_memory_mb": 1.0}
    return {"task": task, "family": "symmetric", "train_seed": train_seed,
            "split_seed": split_seed, "informative_sites": star, "informative_sites_v2": star,
            "sites": 99, "even_share": 0.5, "methods": methods,
            "bootstrap": dict({m: draws for m in M.METHODS}, recovery_top1=[None] * len(draws),
                              recovery_top5pct=[None] * len(draws),
                              **{k: draws for k in H.keys()}),
            # protocol v4's block (bench.headline reads it): every row at R
            "v4": {"R_pair": {k: R for k in H.ROWS}, "R": {k: R for k in H.ROWS},
                   "answer_column_share": 0.5, "top3_share": 0.7},
            "recovery": {"top1": rec, "top5pct": rec},
            "compute": {"timed": True, "stages": [], "costs": {m: cost for m in AG.METHOD_STAGES}}}


def test_headline_interval_seed_spread_and_the_small_star_rule():
    runs = [_fake_run("ioi", 0, 1, 0.2, [0.2]), _fake_run("ioi", 1, 1, 0.4, [0.4]),
            _fake_run("induction", 0, 1, 0.6, [0.6]), _fake_run("induction", 1, 1, 0.8, [0.8]),
            # a task with |S*| < 10 is reported, not in the headline
            _fake_run("successor", 0, 1, 0.0, [0.0], star=6)]
    s = AG.summarize(runs, n_draws=400, seed=0)
    assert s["tasks"]["ioi"]["methods"]["S1-proj"]["R"] == pytest.approx(0.3)
    assert s["headline_tasks"] == ["induction", "ioi"] and s["left_out_small_star"] == ["successor"]
    h = s["families"]["all"]["methods"]["S1-proj"]
    assert h["value"] == pytest.approx(0.5)
    # draws: each task resamples its two training seeds: 0.2 / 0.3 / 0.4 and 0.6 / 0.7 / 0.8
    assert 0.4 - 1e-9 <= h["ci95"][0] < 0.5 < h["ci95"][1] <= 0.6 + 1e-9
    assert abs(h["bias"]) < 0.02 and h["outside"] is False
    seeds = h["seeds"]  # (0, 1): ioi 0.2, induction 0.6; (1, 1): 0.4, 0.8
    assert seeds["combinations"] == 2 and seeds["min"] == pytest.approx(0.4)
    assert seeds["max"] == pytest.approx(0.6) and seeds["sd"] > 0
    # a combination missing a task is averaged over the tasks present, never dropped
    s = AG.summarize(runs[:3], n_draws=50, seed=0)
    seeds = s["families"]["all"]["methods"]["S1-proj"]["seeds"]
    assert seeds["combinations"] == 2 and seeds["max"] == pytest.approx(0.4)
    rows = {r["method"]: r for r in s["verdict"]["all"]}
    assert rows["S1-proj"]["ratio_naive_batched"] == pytest.approx(0.05)
    assert rows["S1-proj"]["holds_ratio_naive_batched"] is False   # R 0.4 < 0.88


def test_families_partition_the_tasks():
    assert sorted(FAMILIES["consistent"] + FAMILIES["symmetric"]) == sorted(TASKS)
    assert set(FAMILIES["consistent"]) == {"greater_than", "brackets", "pronoun", "agreement"}


# ----------------------------------------------------------------------------- standard scale

@pytest.mark.parametrize("name", list(TASKS))
def test_standard_layout_spreads_filler_between_units_and_keeps_the_rule(name):
    task = task_at(name, 24)
    n = 300
    p = task.sample(n, torch.Generator().manual_seed(3))
    assert p.clean.shape == p.corrupt.shape == (n, 24)
    assert int(p.clean.max()) < VOCAB_STANDARD and (p.clean[:, 0] == 1).all()  # BOS first
    rows = torch.arange(n)
    assert (p.clean[rows, p.contrast] != p.corrupt[rows, p.contrast]).all()
    assert ((p.clean != p.corrupt).sum(1) == 1).all()
    # at least 8 positions between p* and the answer position (the last)
    assert int((23 - p.contrast).min()) - 1 >= MIN_AFTER_CONTRAST
    # the layout varies across pairs; filler lies between the task's tokens
    assert p.contrast.unique().numel() > 1
    filler = p.clean >= FILLER0
    assert filler[:, 1:-1].any(0).sum() > 10 and not filler[:, -1].any()
    if name == "induction":  # the copied bigram (a b) stays adjacent
        a = p.clean[rows, p.contrast - 1]
        assert (a < FILLER0).all() and (p.clean[:, -1] == a).all()
    for i in range(0, n, 7):
        assert task.rule(p.clean[i]) == int(p.answer[i])
        assert task.rule(p.corrupt[i]) == int(p.wrong[i])
    with pytest.raises(ValueError, match="seq_len"):
        task_at(name, 11)


def test_standard_checkpoints_train_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEEROPS_CACHE", str(tmp_path))
    # a model the repository ships is loaded, never trained: none is shipped here
    monkeypatch.setattr(model_store, "CHECKPOINT_DIR", str(tmp_path / "shipped"))
    calls = []
    real = train._train_pinned

    # a 3-step budget: the recipe the cache is checked against
    monkeypatch.setitem(scales.SCALES, "standard", dict(scales.SCALES["standard"], max_steps=3))

    def counted(name, scale, seed, path, max_steps, progress):
        calls.append((name, seed))
        return real(name, scale, seed, path, max_steps, progress)
    monkeypatch.setattr(train, "_train_pinned", counted)
    model, info = train.ensure_checkpoint("successor", "standard", 1, progress=False)
    assert calls == [("successor", 1)]
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 128
    assert info["seq_len"] == 24 and info["seed"] == 1 and info["threads"] == 1
    assert info["decay"] is True and info["flush_denormal"] is True
    # v4: the benchmark's own initialisation, trained on the pinned math paths (a child
    # process when this one is not pinned), and the paths recorded
    assert info["seeded_init"] is True
    assert info["math_paths"]["cpu_capability"] == "AVX2"
    assert info["math_paths"]["MKL_CBWR"] == "AVX2"
    path = os.path.join(model_store.cache_dir(), "successor-seed1.safetensors")
    assert path.startswith(str(tmp_path)) and os.path.exists(path)
    assert not os.path.exists(path + ".resume.pt")  # the training state is gone at the end
    again, _ = train.ensure_checkpoint("successor", "standard", 1, progress=False)
    assert calls == [("successor", 1)]  # cached: not trained twice
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # deterministic: the same seed retrains (pinned) to the same weights
    other = tmp_path / "again"
    other.mkdir()
    real("successor", "standard", 1, str(other / "successor-seed1.safetensors"), 3, False)
    fresh, _ = model_store.load_checkpoint("successor", str(other), scale="standard", seed=1)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    # a changed recipe (here a larger budget than the one this model ran out of) retrains
    monkeypatch.setitem(scales.SCALES, "standard", dict(scales.SCALES["standard"], max_steps=4))
    _, info4 = train.ensure_checkpoint("successor", "standard", 1, progress=False)
    assert calls == [("successor", 1)] * 2 and info4["steps"] == 4 and info4["max_steps"] == 4


@pytest.mark.parametrize("info, same", [
    (dict(lr=1e-3, batch_pairs=128, steps=1200, max_steps=2500), True),   # stopped early
    (dict(lr=1e-3, batch_pairs=128, steps=1200), True),                   # v1: budget 2500
    (dict(lr=1e-3, batch_pairs=128, steps=2500), False),                  # ran out of 2500
    (dict(lr=1e-3, batch_pairs=128, steps=6000, max_steps=6000), True),   # same budget
    (dict(lr=1e-3, batch_pairs=128, steps=7000, max_steps=8000), False),  # past today's 6000
    (dict(lr=1e-3, batch_pairs=128, steps=5000, max_steps=8000), True),   # within 6000
    (dict(lr=3e-3, batch_pairs=128, steps=100, max_steps=2500), False),   # other lr
    (dict(lr=1e-3, batch_pairs=64, steps=100, max_steps=2500), False),    # other batch
])
def test_a_cached_checkpoint_is_reused_only_under_the_same_recipe(info, same):
    wanted = dict(lr=1e-3, batch_pairs=128, max_steps=6000, target=0.99, decay=False)
    assert train.same_training(info, wanted) is same
    # another stopping target or schedule is another recipe
    assert not train.same_training(dict(info, target=0.98), wanted)
    assert not train.same_training(dict(info, decay=True), wanted)
    assert not train.same_training(dict(info, curriculum="hops"), wanted)


# ----------------------------------------------------------------------------- resumable runs

TINY = dict(scale="toy", n_fit=8, n_val=4, n_eval=6, s2_steps=2, n_boot=8, n_boot_hier=40,
            repeats=0, split_seeds=2, realistic_pairs=1, realistic_pairs_1b=0)


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    full, _ = A.run(["successor", "pronoun"], out_dir=str(tmp_path / "a"), progress=False,
                    with_realistic=False, settings=TINY)
    # a run killed after its third job: the shards of the first three are on disk
    done = []
    real = A.run_one

    def dies(*args, **kwargs):
        if len(done) == 3:
            raise RuntimeError("killed")
        done.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(A, "run_one", dies)
    with pytest.raises(RuntimeError, match="killed"):
        A.run(["successor", "pronoun"], out_dir=str(tmp_path / "b"), progress=False,
              with_realistic=False, settings=TINY)
    monkeypatch.setattr(A, "run_one", real)
    resumed, _ = A.run(["successor", "pronoun"], out_dir=str(tmp_path / "b"), progress=False,
                       with_realistic=False, settings=TINY)
    assert resumed["runs_resumed"] == 3 and resumed["runs_done"] == 4
    strip = lambda r: {k: v for k, v in r.items() if k != "compute"}  # noqa: E731 (times vary)
    assert [strip(r) for r in resumed["runs"]] == [strip(r) for r in full["runs"]]
    head = lambda r: r["families"]["all"]["methods"]["S1-proj"]  # noqa: E731
    assert head(resumed)["value"] == head(full)["value"]
    assert head(resumed)["ci95"] == head(full)["ci95"]   # the bootstrap is seeded
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["complete"] and head(data)["seeds"]["combinations"] == 2


def test_a_shard_from_other_weights_is_recomputed_on_the_model_the_run_loads(tmp_path,
                                                                             capsys):
    from steerops.bench.provenance import read_shard, write_shard
    from steerops.bench.run_store import shard_path
    settings = dict(TINY, split_seeds=1)
    out = str(tmp_path)
    first, _ = A.run(["successor"], out_dir=out, progress=False, with_realistic=False,
                     settings=settings)
    path = shard_path(out, settings, "successor", 0, first["runs"][0]["split_seed"])
    shard = read_shard(path)
    truth = shard["model"]["weights_sha256"]
    # as if the shard had been computed before the model was shipped (other weights)
    write_shard(path, dict(shard, model=dict(shard["model"], weights_sha256="0" * 64)))
    A.run(["successor"], out_dir=out, progress=False, with_realistic=False, settings=settings,
          report_only=True)
    assert os.path.exists(path)  # a report reads what was run, it recomputes nothing
    again, _ = A.run(["successor"], out_dir=out, progress=False, with_realistic=False,
                     settings=settings)
    assert "set aside" in capsys.readouterr().err and os.path.exists(path + ".other-model")
    assert again["runs_resumed"] == 0 and read_shard(path)["model"]["weights_sha256"] == truth
    again, _ = A.run(["successor"], out_dir=out, progress=False, with_realistic=False,
                     settings=settings)
    assert again["runs_resumed"] == 1  # the same weights: reused


def test_models_below_95_percent_are_excluded_and_report_only_is_partial(tmp_path, monkeypatch):
    real = A.ensure_checkpoint

    def weak_pronoun(task, *args, **kwargs):
        model, info = real(task, *args, **kwargs)
        return model, dict(info, held_out_accuracy=0.9) if task == "pronoun" else info
    monkeypatch.setattr(A, "ensure_checkpoint", weak_pronoun)
    settings = dict(TINY, split_seeds=1)
    results, table = A.run(["successor", "pronoun"], out_dir=str(tmp_path), progress=False,
                           with_realistic=False, settings=settings)
    assert results["excluded_models"] == [{"task": "pronoun", "train_seed": 0,
                                           "held_out_accuracy": 0.9}]
    # an excluded model's runs are left out, not missing: the run is complete
    assert not results["partial"] and results["missing_runs"] == []
    assert results["runs_excluded"] == 1 and results["runs_done"] == 1
    assert list(results["tasks"]) == ["successor"] and "Excluded: pronoun" in table
    monkeypatch.setattr(A, "run_one", lambda *a, **k: pytest.fail("report-only ran a job"))
    # --report-only loads no model: the exclusion comes from the checkpoint's record
    real_info = A.checkpoint_info
    monkeypatch.setattr(A, "checkpoint_info", lambda task, *a: dict(
        real_info(task, *a), held_out_accuracy=0.9 if task == "pronoun" else 1.0))
    report, table = A.run(["successor", "pronoun"], out_dir=str(tmp_path), progress=False,
                          with_realistic=False, settings=settings, report_only=True)
    assert report["excluded_models"] == results["excluded_models"] and not report["partial"]
    # a run still missing (its model not excluded) makes the report partial
    monkeypatch.setattr(A, "checkpoint_info", real_info)
    report, table = A.run(["successor", "pronoun"], out_dir=str(tmp_path), progress=False,
                          with_realistic=False, settings=settings, report_only=True)
    assert report["partial"] and report["missing_runs"] == [
        ["pronoun", 0, A.split_seeds("pronoun", 0, settings)[0]]]  # nested split seeds (v4)
    assert report["runs_done"] == 1 and "Partial: 1 of 2 runs" in table
    assert "(missing 1: pronoun seed 0 (1); rerun the same command" in table  # which model
