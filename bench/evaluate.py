"""One run of the attribution benchmark (docs/protocol.md v3): one task model, one split
seed. Patching gives the ground truth g; every method of ``bench.methods`` scores the
same sites S* on the same pairs; every stage is counted (FlopCounterMode), priced by
``bench.pricing``'s rules, its peak memory read and (when asked) timed; the run's
bootstrap draws resample its eval pairs (``bench.bootstrap`` resamples the rest).
"""
import numpy as np
import torch

import steerops
from steerops.sweeps.flops import analytic_forward_flops, reuse_sweep_flops, token_layer_flops

from . import controls as C
from . import faithfulness as F
from . import methods as M
from . import pricing as P
from .compute import Ledger


# ----------------------------------------------------------------------------- data

def _metric_values(model, ids, answer, wrong):
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
    rows = torch.arange(ids.shape[0])
    return logits[rows, answer] - logits[rows, wrong], logits.argmax(-1)


def make_splits(task, model, n_fit, n_val, n_eval, seed, device):
    """Disjoint D_fit / D_val / D_eval of pairs the model gets right on clean with
    m(clean) - m(corrupt) > 1; returns (splits, kept fraction)."""
    gen = torch.Generator().manual_seed(seed)
    need = n_fit + n_val + n_eval
    pool = task.sample(4 * need + 64, gen)
    keys = torch.cat([pool.clean, pool.corrupt], 1)
    _, first = np.unique(keys.numpy(), axis=0, return_index=True)
    pool = pool.select(torch.as_tensor(np.sort(first)))  # distinct pairs only
    m_clean, pred = _metric_values(model, pool.clean.to(device), pool.answer.to(device),
                                   pool.wrong.to(device))
    m_corrupt, _ = _metric_values(model, pool.corrupt.to(device), pool.answer.to(device),
                                  pool.wrong.to(device))
    keep = ((pred.cpu() == pool.answer) & ((m_clean - m_corrupt).cpu() > 1))
    kept = pool.select(torch.nonzero(keep).flatten())
    if len(kept) < need:  # a small task space: shrink the three splits in proportion
        scale = len(kept) / need
        n_fit, n_val = max(2, int(n_fit * scale)), max(2, int(n_val * scale))
        n_eval = max(2, len(kept) - n_fit - n_val)
        if n_fit + n_val + n_eval > len(kept):
            raise RuntimeError(f"task {task.name}: only {len(kept)} usable pairs")
    cuts = np.cumsum([0, n_fit, n_val, n_eval])
    splits = {name: kept.select(torch.arange(cuts[i], cuts[i + 1]))
              for i, name in enumerate(("fit", "val", "eval"))}
    return splits, float(keep.float().mean())


def _caches(model, pairs, device):
    c = steerops.cache_activations(model, pairs.clean.to(device)).acts.float().cpu()
    x = steerops.cache_activations(model, pairs.corrupt.to(device)).acts.float().cpu()
    return c, x


def effects(raw, m_clean, m_corrupt):
    """g per site: ratio of means over the pairs."""
    return ((raw.mean(0) - m_corrupt.mean()) / (m_clean - m_corrupt).mean()).numpy()


# ----------------------------------------------------------------------------- scoring

def per_pair_scores(fit_dp, fit_answer, diffs, grads, ev_answer, twin_seed):
    """Per-pair scores (n_eval, L+1, T) of the methods that need no further forward,
    plus the S1 vectors and the random twins' directions (v3's randvec controls are
    the first twin)."""
    v = M.fit_vectors(fit_dp)
    twins = C.twin_directions(v, twin_seed)
    rand = twins[0]
    scores = {
        "S1-proj": M.projection(diffs, v),
        "S1-proj-abs": M.projection_abs(diffs, v),
        "S1-lin": M.linearised(diffs, grads, v),
        "S1-class": M.projection(diffs, M.class_vectors(fit_dp, fit_answer, ev_answer)),
        "AtP": M.atp(diffs, grads),
        "norm": M.norm_scores(diffs),
        "S1-proj-randvec": M.projection(diffs, rand),
        "S1-proj-abs-randvec": M.projection_abs(diffs, rand),
    }
    return {k: x.double() for k, x in scores.items()}, v, twins


def twin_scores(diffs, grads, twins):
    """The cheap readings' random-direction twins: {twin name: [per draw (n, L+1, T)]}."""
    out = {C.TWINS["S1-proj"]: [], C.TWINS["S1-proj-abs"]: [], C.TWINS["S1-lin"]: []}
    for r in twins:
        out[C.TWINS["S1-proj"]].append(M.projection(diffs, r).double())
        out[C.TWINS["S1-proj-abs"]].append(M.projection_abs(diffs, r).double())
        out[C.TWINS["S1-lin"]].append(M.linearised(diffs, grads, r).double())
    return out


def score_all(maps, g, star, star_v2):
    """Every method's v3 measures on S* (|a| and signed ranking), and v2's R (grid of
    k, S* with the dead sites) beside them."""
    gs = g[star]
    R_norm = {mode: F.measures_v3(maps["norm"][star], gs, signed=mode == "signed")["R"]
              for mode in ("abs", "signed")}
    out = {}
    for name, a in maps.items():
        out[name] = {mode: F.measures_v3(a[star], gs, signed=mode == "signed",
                                         R_norm=R_norm[mode]) for mode in ("abs", "signed")}
        out[name]["v2_R"] = F.measures(np.nan_to_num(a[star_v2]), g[star_v2])["R"]
    out["random"] = {mode: F.random_measures_v3(gs, R_norm[mode]) for mode in ("abs", "signed")}
    out["random"]["v2_R"] = F.random_R(g[star_v2])
    return out


def recovery_sets(g, star, exact_effect, denominator):
    """Intervention recovery at g's top-1 and top-5% sites of S*: steering recovery
    (S1-exact's effect / E[m(clean) - m(corrupt)]) beside g, ratio of sums, guarded."""
    flat = np.flatnonzero(star.ravel())
    order = flat[np.argsort(-g.ravel()[flat], kind="stable")]
    out = {}
    for label, k in (("top1", 1), ("top5pct", F.top_k_count(flat.size, 0.05))):
        chosen = order[:k]
        steer = exact_effect.ravel()[chosen] / denominator
        patch = g.ravel()[chosen]
        out[label] = {"sites": [[int(i // g.shape[1]), int(i % g.shape[1])] for i in chosen],
                      "steering": steer.tolist(), "patching": patch.tolist(),
                      "sum_g": float(patch.sum()),
                      "ratio": F.guarded_recovery(steer, patch)}
    return out


def even_share(plus, minus, star):
    """S1-exact's sign-flip split per pair and site of S*: odd = (e+ - e-) / 2 follows
    the direction, even = (e+ + e-) / 2 does not; share = E|even| / (E|odd| + E|even|)."""
    s = torch.as_tensor(star)
    odd, even = ((plus - minus) / 2)[:, s], ((plus + minus) / 2)[:, s]
    total = float(odd.abs().mean() + even.abs().mean())
    return float(even.abs().mean()) / total if total > 0 else float("nan")


def differing_sites(diffs, star):
    """Per pair, the sites of S* where its clean and corrupt activations differ."""
    differ = (diffs != 0).any(-1).numpy() & star[None]
    return [[tuple(int(x) for x in s) for s in np.argwhere(d)] for d in differ]


# ----------------------------------------------------------------------------- one run

def run_one(task, model, settings, split_seed, device, timing_repeats=0, splits=None,
            train_seed=0):
    """Every number of one (task model, split seed): see the module docstring.
    ``splits``: given D_fit / D_val / D_eval (the realistic-size timing uses random
    pairs) instead of sampling them from ``task``. The random twins' directions come
    from a seed derived from (task, training seed, split seed)."""
    cfg = model.config
    T = task.seq_len
    L1 = (getattr(cfg, "num_hidden_layers", None) or cfg.n_layer) + 1
    kept = None
    if splits is None:
        splits, kept = make_splits(task, model, settings["n_fit"], settings["n_val"],
                                   settings["n_eval"], split_seed, device)
    fit, val, ev = splits["fit"], splits["val"], splits["eval"]
    n_fit, n_val, n_ev = len(fit), len(val), len(ev)
    ledger = Ledger(cfg)

    def stage(name, fn, **kw):
        # memory is read with the timings (each model's first split): a stage's peak
        # depends on its shapes, not on which pairs it gets, and the read costs a run
        return ledger.run(name, fn, tokens=T, repeats=timing_repeats, device=device,
                          memory=timing_repeats > 0, **kw)

    def reuse_flops(work):  # a reuse sweep's work as run (its base runs carry the full head)
        return float(work.get("base_rows", 0) * analytic_forward_flops(cfg, T)
                     + work.get("token_layers_run", 0) * token_layer_flops(cfg, T)
                     + work.get("head_tokens", 0) * P.head_flops(cfg))

    # --- patching, in its cheapest correct form (steerops.sweeps.reuse 'full'; named, not 'auto':
    # auto's choice is timed, and the ledger must not depend on the machine)
    metric = steerops.logit_diff(ev.answer.to(device), ev.wrong.to(device))
    sweep = stage("patching", lambda: steerops.patching_sweep(
        model, ev.clean.to(device), ev.corrupt.to(device), metric, progress=False,
        reuse="full", distributed=False),  # under torch.distributed each rank runs whole models
        sequences=2 * n_ev + n_ev * L1 * T)
    reuse = sweep.extra["reuse"]
    ledger.amend("patching", sequences=sweep.rows, analytic_override=reuse_sweep_flops(
        cfg, reuse, n_ev, T))
    raw = sweep.raw.cpu().double()
    m_clean, m_corrupt = sweep.clean_metric.cpu().double(), sweep.corrupt_metric.cpu().double()
    g = effects(raw, m_clean, m_corrupt)
    denominator = float((m_clean - m_corrupt).mean())

    # --- caches and gradients (the cheap methods' inputs)
    fit_c, fit_x = stage("fit_caches", lambda: _caches(model, fit, device),
                         sequences=2 * n_fit, lm_head=False)
    fit_dp = M.at_contrast(fit_c - fit_x, fit.contrast)
    ev_c = stage("eval_clean_cache", lambda: steerops.cache_activations(
        model, ev.clean.to(device)).acts.float().cpu(), sequences=n_ev, lm_head=False)
    ev_x = stage("eval_corrupt_cache", lambda: steerops.cache_activations(
        model, ev.corrupt.to(device)).acts.float().cpu(), sequences=n_ev, lm_head=False)
    diffs = ev_c - ev_x
    grads = stage("eval_grads", lambda: steerops.cache_gradients(
        model, ev.corrupt.to(device), metric).grads.float().cpu(), sequences=n_ev,
        backward=True)
    star = F.star_sites(diffs.numpy(), ev.contrast.numpy())
    star_v2 = F.informative_sites(diffs.numpy(), ev.contrast.numpy())
    star_list = [tuple(int(x) for x in s) for s in np.argwhere(star)]
    twin_seed = C.derived_seed("twin", task.name, train_seed, split_seed)
    per_pair, vectors, twins = per_pair_scores(fit_dp, fit.answer, diffs, grads, ev.answer,
                                               twin_seed)
    twin = twin_scores(diffs, grads, twins)

    # --- D_val choices (alpha grid in the cheapest form), S1-exact (+-v) and its control
    def val_stage():
        base = M.base_metrics(model, val, device)
        acts = steerops.cache_activations(model, val.corrupt.to(device)).acts.float().cpu()
        return base, M.val_recovery_table_reuse(model, val, acts, vectors, device, base)
    val_base, (table, val_work) = stage("val_table", val_stage, sequences=3 * n_val)
    ledger.amend("val_table", analytic_override=2 * n_val * analytic_forward_flops(cfg, T)
                 + n_val * analytic_forward_flops(cfg, T, False) + reuse_flops(val_work))
    alphas = M.choose_alphas(table)
    # the twins' steered sweeps (+r and -r for each draw) are stages of their own: controls
    # are priced as their reading, never into it
    sweeps = {"exact_sweep": {"plus": vectors}, "exact_sweep_negative": {"minus": -vectors},
              "exact_sweep_randvec": {f"twin{k}": r for k, r in enumerate(twins)},
              "exact_sweep_randvec_negative": {f"-twin{k}": -r for k, r in enumerate(twins)}}
    steered = {}
    for name, variants in sweeps.items():
        out, work = stage(name, lambda variants=variants: M.steered_sweeps(
            model, ev, ev_x, variants, alphas, star, device),
            sequences=len(variants) * work_rows(star, n_ev))
        steered.update(out)
        ledger.amend(name, analytic_override=reuse_flops(work))
    per_pair["S1-exact"] = steered["plus"]
    per_pair["S1-exact-odd"] = (steered["plus"] - steered["minus"]) / 2
    per_pair["S1-exact-randvec"] = steered["twin0"]
    twin[C.TWINS["S1-exact"]] = [steered[f"twin{k}"] for k in range(len(twins))]
    twin[C.TWINS["S1-exact-odd"]] = [(steered[f"twin{k}"] - steered[f"-twin{k}"]) / 2
                                     for k in range(len(twins))]
    s2_layer, s2_alpha = M.choose_layer_alpha(table)
    v2, history = stage("s2_optimise", lambda: M.optimise_s2(
        model, fit, s2_layer, s2_alpha, vectors[s2_layer], settings["s2_steps"], device),
        sequences=settings["s2_steps"] * n_fit, backward=True)
    fwd = analytic_forward_flops(cfg, T)
    above = (L1 - 1 - s2_layer) / (L1 - 1)
    ledger.amend("s2_optimise", analytic_override=float(
        settings["s2_steps"] * n_fit * fwd * (1 + above)))
    per_pair["S2"] = M.projection(diffs, v2.expand(L1, -1)).double()
    twin[C.TWINS["S2"]] = [M.projection(diffs, r.expand(L1, -1)).double() for r in
                           C.twin_directions(v2[None], C.derived_seed("twin-S2", task.name,
                                                                      train_seed, split_seed))]

    maps = {k: x.mean(0).numpy() for k, x in per_pair.items()}
    scored = score_all(maps, g, star, star_v2)
    recovery = recovery_sets(g, star, maps["S1-exact"], denominator)

    # --- pricing: one rule set for both sides (bench.pricing)
    floors = P.run_stages(cfg, T, n_fit=n_fit, n_val=n_val, n_eval=n_ev,
                          val_contrast=val.contrast.tolist(), star_sites=star_list,
                          grid=M.ALPHA_GRID, s2_steps=settings["s2_steps"], s2_layer=s2_layer)
    differing = differing_sites(diffs, star)
    forms = P.patching_forms(cfg, T, differing, L1 * T)
    floors["patching"] = forms["floor"]
    for s in ledger.stages:
        s.floor_flops = floors[s.name]
    costs = P.method_costs(floors, forms)
    stages = {s.name: s for s in ledger.stages}
    for m, stage_names in P.METHOD_STAGES.items():
        chosen = [stages[n] for n in stage_names]
        costs[m].update(
            counted_flops=sum(s.counted_flops for s in chosen),
            seconds=sum(s.seconds for s in chosen) if timing_repeats else None,
            peak_memory_mb=max([s.peak_memory_mb or 0 for s in chosen], default=0)
            if timing_repeats else None)
    patch = stages["patching"]
    costs["patching"] = {"flops": forms["floor"], "forms": forms,
                         "counted_flops": patch.counted_flops,
                         "seconds": patch.seconds if timing_repeats else None,
                         "peak_memory_mb": patch.peak_memory_mb}
    for m in P.METHOD_STAGES:
        c = costs[m]
        c["ratio_counted_flops"] = c["counted_flops"] / patch.counted_flops
        c["ratio_seconds"] = (c["seconds"] / patch.seconds) if timing_repeats else None

    for c in costs.values():  # forward-equivalents per eval pair beside the ratios
        if "flops" in c:
            c["forward_equivalents_per_pair"] = c["flops"] / (fwd * n_ev)
            c["forward_equivalents_per_pair_amortised"] = c.get(
                "flops_amortised", c["flops"]) / (fwd * n_ev)
    v4 = version4(per_pair, twin, raw, m_clean, m_corrupt, diffs, star, ev.contrast.numpy(),
                  g)
    # the first eval pair's tokens: its own g and scores drawn over its prompt (the mean
    # maps mix pairs whose layouts differ, as the multi-hop tasks' do)
    v4["per_pair"]["example"] = {"clean": ev.clean[0].tolist(),
                                 "corrupt": ev.corrupt[0].tolist()}
    draws = bootstrap(per_pair, raw, m_clean, m_corrupt, star, settings["n_boot"], split_seed,
                      v4.pop("pair_R"))
    return {
        "task": task.name, "family": getattr(task, "family", None) or (
            "consistent" if task.binary else "symmetric"),
        "split_seed": split_seed, "seq_len": T, "layers": L1, "sites": L1 * T,
        "informative_sites": int(star.sum()), "informative_sites_v2": int(star_v2.sum()),
        "star": star.tolist(), "contrast_positions": sorted(set(ev.contrast.tolist())),
        "pairs": {"fit": n_fit, "val": n_val, "eval": n_ev}, "usable_pair_fraction": kept,
        "effects": g.tolist(), "scores": {k: np.nan_to_num(v).tolist() for k, v in maps.items()},
        "methods": scored, "bootstrap": draws, "recovery": recovery,
        "even_share": even_share(steered["plus"], steered["minus"], star),
        "alphas": alphas, "val_table": table.tolist(),
        "s2": {"layer": s2_layer, "alpha": s2_alpha, "metric_history": history},
        "compute": {"costs": costs, "stages": ledger.as_dicts(), "timed": timing_repeats > 0},
        "v4": v4, "twin_seed": twin_seed,
    }


def version4(per_pair, twin, raw, m_clean, m_corrupt, diffs, star, contrast, g):
    """Protocol v4's per-run numbers (bench.controls): per pair g^i and every reading's,
    twin's and prior's R on each pair's own map (``pair_R``: (n,) per name, for the
    bootstrap), R_pair (their mean), the twins' and priors' R on the mean map, the
    answer-column and top-3 shares, and the per-pair data the report is rebuilt from."""
    n, L1, T = raw.shape
    g_pairs = C.pair_effects(raw.numpy(), m_clean.numpy(), m_corrupt.numpy())
    stars = C.pair_star(diffs.numpy(), star)
    pair_R = {name: C.pair_R(x.numpy(), g_pairs, stars) for name, x in per_pair.items()}
    mean_map_R = {}
    for name, draws_ in twin.items():
        pair_R[name] = np.mean([C.pair_R(x.numpy(), g_pairs, stars) for x in draws_], 0)
        mean_map_R[name] = float(np.mean([F.R_all_k(np.abs(np.nan_to_num(
            x.mean(0).numpy()[star])), g[star]) for x in draws_]))
    priors = {"prior-answer": np.broadcast_to(C.prior_answer(L1, T), (n, L1, T)),
              "prior-path": C.prior_path(L1, T, contrast)}
    for name, x in priors.items():
        pair_R[name] = C.pair_R(x, g_pairs, stars)
        mean_map_R[name] = F.R_all_k(x.mean(0)[star], g[star])
    pair_R["random"] = np.array([F.random_measures_v3(gi[s])["R"] if s.any() else np.nan
                                 for gi, s in zip(g_pairs, stars)])
    return {"R_pair": {k: C.mean_of(v) for k, v in pair_R.items()}, "R": mean_map_R,
            "pair_R": pair_R, **C.shares(g, star),
            # on S* only (the sites every R reads): (n, |S*|) in S*'s row-major order
            "per_pair": {"pairs": n, "star_sites": int(star.sum()),
                         "g": _rounded(g_pairs[:, star]),
                         "pair_star": stars[:, star].astype(np.uint8).ravel().tolist(),
                         "scores": {k: _rounded(np.nan_to_num(x.numpy()[:, star]))
                                    for k, x in per_pair.items()}}}


def _rounded(x, digits=6):
    """A flat list at ``digits`` significant digits (the shards stay small; every number
    the report prints is computed before rounding)."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(x, dtype=np.float64).ravel()]


PAIR = "pair:"  # bootstrap keys of R_pair draws


def work_rows(star, pairs):
    return int(pairs * (1 + star.sum()))


def bootstrap(per_pair, raw, m_clean, m_corrupt, star, n_boot, seed, pair_R=None):
    """Within-run draws for the hierarchical bootstrap: the run's eval pairs resampled
    (the vectors stay those fitted on its D_fit; bench.bootstrap resamples training
    and split seeds above this). Every method's R (|a|, S*) and the recoveries, per
    draw; the draws use the same resamples for every method."""
    rng = np.random.default_rng(seed)
    n = raw.shape[0]
    pair_R = pair_R or {}
    out = {m: [] for m in list(per_pair) + ["random", "recovery_top1", "recovery_top5pct"]
           + [PAIR + k for k in pair_R]}
    s = torch.as_tensor(star)
    for _ in range(n_boot):
        idx = torch.as_tensor(rng.integers(0, n, n))
        for name, values in pair_R.items():  # R_pair of the resample: the same pairs
            out[PAIR + name].append(C.mean_of(values[idx.numpy()]))
        g = effects(raw[idx], m_clean[idx], m_corrupt[idx])
        gs = g[star]
        for name, x in per_pair.items():
            a = x[idx][:, s].mean(0).numpy()
            out[name].append(F.R_all_k(np.abs(a), gs))
        out["random"].append(F.random_measures_v3(gs)["R"])
        exact = per_pair["S1-exact"][idx].mean(0).numpy()
        rec = recovery_sets(g, star, exact, float((m_clean[idx] - m_corrupt[idx]).mean()))
        out["recovery_top1"].append(rec["top1"]["ratio"])
        out["recovery_top5pct"].append(rec["top5pct"]["ratio"])
    return out
