"""One run of the attribution benchmark (docs/protocol.md v3): one task model, one split
seed. Patching gives the ground truth g; every method of ``bench.methods`` scores the
same sites S* on the same pairs; every stage is counted (FlopCounterMode), priced by
``bench.pricing``'s rules, its peak memory read and (when asked) timed; the run's
bootstrap draws resample its eval pairs (``bench.bootstrap`` resamples the rest).
"""
import numpy as np
import torch

import steerops
from steerops.flops import token_layer_flops

from . import faithfulness as F
from . import methods as M
from . import pricing as P
from .compute import Ledger, analytic_forward_flops, reuse_sweep_flops


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

def per_pair_scores(fit_dp, fit_answer, diffs, grads, ev_answer, generator):
    """Per-pair scores (n_eval, L+1, T) of the methods that need no further forward,
    plus the S1 vectors and the random control's directions."""
    v = M.fit_vectors(fit_dp)
    rand = M.random_vectors(v, generator)
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
    return {k: x.double() for k, x in scores.items()}, v, rand


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

def run_one(task, model, settings, split_seed, device, timing_repeats=0, splits=None):
    """Every number of one (task model, split seed): see the module docstring.
    ``splits``: given D_fit / D_val / D_eval (the realistic-size timing uses random
    pairs) instead of sampling them from ``task``."""
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
    gen = torch.Generator().manual_seed(split_seed)

    def stage(name, fn, **kw):
        # memory is read with the timings (each model's first split): a stage's peak
        # depends on its shapes, not on which pairs it gets, and the read costs a run
        return ledger.run(name, fn, tokens=T, repeats=timing_repeats, device=device,
                          memory=timing_repeats > 0, **kw)

    def reuse_flops(work):  # a reuse sweep's work as run (its base runs carry the full head)
        return float(work.get("base_rows", 0) * analytic_forward_flops(cfg, T)
                     + work.get("token_layers_run", 0) * token_layer_flops(cfg, T)
                     + work.get("head_tokens", 0) * P.head_flops(cfg))

    # --- patching, in its cheapest correct form (steerops.reuse 'full'; named, not 'auto':
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
    per_pair, vectors, rand_v = per_pair_scores(fit_dp, fit.answer, diffs, grads, ev.answer,
                                                gen)

    # --- D_val choices (alpha grid in the cheapest form), S1-exact (+-v) and its control
    def val_stage():
        base = M.base_metrics(model, val, device)
        acts = steerops.cache_activations(model, val.corrupt.to(device)).acts.float().cpu()
        return base, M.val_recovery_table_reuse(model, val, acts, vectors, device, base)
    val_base, (table, val_work) = stage("val_table", val_stage, sequences=3 * n_val)
    ledger.amend("val_table", analytic_override=2 * n_val * analytic_forward_flops(cfg, T)
                 + n_val * analytic_forward_flops(cfg, T, False) + reuse_flops(val_work))
    alphas = M.choose_alphas(table)
    variants = {"plus": vectors, "minus": -vectors, "randvec": rand_v}
    steered, sweep_work = {}, {}
    for name, key in (("exact_sweep", "plus"), ("exact_sweep_negative", "minus"),
                      ("exact_sweep_randvec", "randvec")):
        out, work = stage(name, lambda key=key: M.steered_sweeps(
            model, ev, ev_x, {key: variants[key]}, alphas, star, device),
            sequences=work_rows(star, n_ev))
        steered[key] = out[key]
        ledger.amend(name, analytic_override=reuse_flops(work))
    per_pair["S1-exact"] = steered["plus"]
    per_pair["S1-exact-odd"] = (steered["plus"] - steered["minus"]) / 2
    per_pair["S1-exact-randvec"] = steered["randvec"]
    s2_layer, s2_alpha = M.choose_layer_alpha(table)
    v2, history = stage("s2_optimise", lambda: M.optimise_s2(
        model, fit, s2_layer, s2_alpha, vectors[s2_layer], settings["s2_steps"], device),
        sequences=settings["s2_steps"] * n_fit, backward=True)
    fwd = analytic_forward_flops(cfg, T)
    above = (L1 - 1 - s2_layer) / (L1 - 1)
    ledger.amend("s2_optimise", analytic_override=float(
        settings["s2_steps"] * n_fit * fwd * (1 + above)))
    per_pair["S2"] = M.projection(diffs, v2.expand(L1, -1)).double()

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

    draws = bootstrap(per_pair, raw, m_clean, m_corrupt, star, settings["n_boot"], split_seed)
    return {
        "task": task.name, "family": "consistent" if task.binary else "symmetric",
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
    }


def work_rows(star, pairs):
    return int(pairs * (1 + star.sum()))


def bootstrap(per_pair, raw, m_clean, m_corrupt, star, n_boot, seed):
    """Within-run draws for the hierarchical bootstrap: the run's eval pairs resampled
    (the vectors stay those fitted on its D_fit; bench.bootstrap resamples training
    and split seeds above this). Every method's R (|a|, S*) and the recoveries, per
    draw; the draws use the same resamples for every method."""
    rng = np.random.default_rng(seed)
    n = raw.shape[0]
    out = {m: [] for m in list(per_pair) + ["random", "recovery_top1", "recovery_top5pct"]}
    s = torch.as_tensor(star)
    for _ in range(n_boot):
        idx = torch.as_tensor(rng.integers(0, n, n))
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
