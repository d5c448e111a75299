"""One run of the attribution benchmark (docs/protocol.md v2): one task model, one split
seed. Patching gives the ground truth g; every method of ``bench.methods`` scores the
same sites on the same pairs; every stage is counted (FlopCounterMode), priced
analytically and (when asked) timed; the bootstrap refits the vectors.
"""
import numpy as np
import torch

import steerops

from . import faithfulness as F
from . import methods as M
from .compute import Ledger, analytic_forward_flops, reuse_sweep_flops, site_floor_flops

# which stages each method needs (its cost is their sum; shared stages count for each)
METHOD_STAGES = {
    "patching": ("patching",),
    "S1-proj": ("fit_caches", "eval_clean_cache", "eval_corrupt_cache"),
    "S1-class": ("fit_caches", "eval_clean_cache", "eval_corrupt_cache"),
    "S1-lin": ("fit_caches", "eval_clean_cache", "eval_grads"),
    "S1-exact": ("fit_caches", "val_table", "exact_sweep"),
    "S2": ("fit_caches", "val_table", "s2_optimise", "eval_clean_cache", "eval_corrupt_cache"),
    "AtP": ("eval_clean_cache", "eval_grads"),
    "norm": ("eval_clean_cache", "eval_corrupt_cache"),
    "random": (),
    "S1-proj-randvec": ("eval_clean_cache", "eval_corrupt_cache"),
    "S1-exact-randvec": ("exact_sweep_randvec",),  # alpha_l of the learned vector, reused
}


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

def score_maps(fit_dp, fit_answer, diffs, grads, ev_answer, generator):
    """Mean scores over the eval pairs for the methods that need no further forward:
    {method: (L+1, T)}, plus the S1 vectors used."""
    v = M.fit_vectors(fit_dp)
    per_pair = {
        "S1-proj": M.projection(diffs, v),
        "S1-lin": M.linearised(diffs, grads, v),
        "S1-class": M.projection(diffs, M.class_vectors(fit_dp, fit_answer, ev_answer)),
        "AtP": M.atp(diffs, grads),
        "norm": M.norm_scores(diffs),
        "S1-proj-randvec": M.projection(diffs, M.random_vectors(v, generator)),
    }
    return {k: x.double().mean(0).numpy() for k, x in per_pair.items()}, v


def score_all(maps, g, star):
    """Every method's measures on S* (|a| and signed ranking) and the v1 numbers
    (signed ranking, all sites, stable tie order)."""
    gs = g[star]
    R_norm = {mode: F.measures(maps["norm"][star], gs, signed=mode == "signed")["R"]
              for mode in ("abs", "signed")}
    out = {}
    for name, a in maps.items():
        out[name] = {mode: F.measures(a[star], gs, signed=mode == "signed",
                                      R_norm=R_norm[mode]) for mode in ("abs", "signed")}
        out[name]["v1_R"] = F.faithfulness_R(np.nan_to_num(a).ravel(), g.ravel())
    R_rand = F.random_R(gs)
    rand = {"R": R_rand, "R_prime": 0.0, "R_skill": F.skill(R_rand, R_norm["abs"]),
            "spearman": float("nan"), "top10_recall": F.top_k_count(gs.size, 0.1) / gs.size,
            "cap": [F.expected_random_capture(gs, f) for f in F.K_FRACTIONS]}
    out["random"] = {"abs": rand, "signed": dict(rand, R_skill=F.skill(R_rand, R_norm["signed"])),
                     "v1_R": F.random_R(g.ravel())}
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


# ----------------------------------------------------------------------------- one run

def run_one(task, model, settings, split_seed, device, timing_repeats=0, heavy_draws=None):
    """Every number of one (task model, split seed): see the module docstring.
    ``heavy_draws``: bootstrap draws for the methods that rerun steered forwards
    (default ``settings["n_boot_heavy"]``)."""
    cfg = model.config
    T = task.seq_len
    L1 = cfg.num_hidden_layers + 1
    splits, kept = make_splits(task, model, settings["n_fit"], settings["n_val"],
                               settings["n_eval"], split_seed, device)
    fit, val, ev = splits["fit"], splits["val"], splits["eval"]
    n_fit, n_val, n_ev = len(fit), len(val), len(ev)
    ledger = Ledger(cfg)
    rep = timing_repeats
    gen = torch.Generator().manual_seed(split_seed)

    def stage(name, fn, **kw):
        return ledger.run(name, fn, tokens=T, repeats=rep, device=device, side="", **kw)

    # --- patching, in its cheapest correct form in FLOPs (steerops.reuse, 'full'; named,
    # not 'auto': auto's choice is timed, and the ledger must not depend on the machine)
    metric = steerops.logit_diff(ev.answer.to(device), ev.wrong.to(device))
    sweep = stage("patching", lambda: steerops.patching_sweep(
        model, ev.clean.to(device), ev.corrupt.to(device), metric, progress=False,
        reuse="full", distributed=False),  # under torch.distributed each rank runs whole models
        sequences=2 * n_ev + n_ev * L1 * T)
    reuse = sweep.extra["reuse"]
    ledger.amend("patching", sequences=sweep.rows, analytic_override=reuse_sweep_flops(
        cfg, reuse, n_ev, T) if reuse["mode"] != "none" else None)
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
    star = F.informative_sites(diffs.numpy(), ev.contrast.numpy())

    maps, vectors = score_maps(fit_dp, fit.answer, diffs, grads, ev.answer, gen)

    # --- D_val choices, S1-exact (and its random-vector control), S2
    val_base = M.base_metrics(model, val, device)
    table = stage("val_table", lambda: M.val_recovery_table(model, val, vectors, device),
                  sequences=(2 + L1 * len(M.ALPHA_GRID)) * n_val)
    alphas = M.choose_alphas(table)
    star_sites = [tuple(s) for s in np.argwhere(star)]
    floor = float(n_ev * (analytic_forward_flops(cfg, T) + site_floor_flops(cfg, T, star_sites)))
    exact = stage("exact_sweep", lambda: M.steered_effects(model, ev, vectors, alphas, star,
                                                           device),
                  sequences=n_ev * (1 + len(star_sites)))
    ledger.amend("exact_sweep", floor_flops=floor)
    rand_v = M.random_vectors(vectors, gen)
    exact_rand = stage("exact_sweep_randvec", lambda: M.steered_effects(
        model, ev, rand_v, alphas, star, device), sequences=n_ev * (1 + len(star_sites)))
    ledger.amend("exact_sweep_randvec", floor_flops=floor)
    maps["S1-exact"] = exact.mean(0).numpy()
    maps["S1-exact-randvec"] = exact_rand.mean(0).numpy()
    s2_layer, s2_alpha = M.choose_layer_alpha(table)
    v2, history = stage("s2_optimise", lambda: M.optimise_s2(
        model, fit, s2_layer, s2_alpha, vectors[s2_layer], settings["s2_steps"], device),
        sequences=settings["s2_steps"] * n_fit, backward=True)
    # the vector's gradient stops at the steered layer: one forward (with head) plus the
    # backward through the blocks above it, per step and pair
    fwd = analytic_forward_flops(cfg, T)
    above = (cfg.num_hidden_layers - s2_layer) / cfg.num_hidden_layers
    ledger.amend("s2_optimise", analytic_override=float(
        settings["s2_steps"] * n_fit * fwd * (1 + above)))
    maps["S2"] = M.projection(diffs, v2.expand(L1, -1)).double().mean(0).numpy()

    scored = score_all(maps, g, star)
    recovery = recovery_sets(g, star, exact.mean(0).numpy(), denominator)

    # --- bootstrap: D_fit and D_eval resampled together, every vector refit
    boot = bootstrap(settings, fit_dp, fit, ev, diffs, grads, raw, m_clean, m_corrupt, star,
                     split_seed)
    heavy = settings["n_boot_heavy"] if heavy_draws is None else heavy_draws
    boot.update(bootstrap_heavy(dict(settings, n_boot_heavy=heavy), model, fit, val, ev, fit_dp,
                                diffs, raw, m_clean, m_corrupt, star, split_seed, device,
                                val_base))

    costs = {m: ledger.totals(names=stages) for m, stages in METHOD_STAGES.items()}
    patch = costs["patching"]
    ratios = {m: {k: c[k] / patch[k] if patch[k] else float("nan")
                  for k in ("floor_flops", "counted_flops", "analytic_flops", "seconds")}
              for m, c in costs.items()}
    return {
        "task": task.name, "family": "consistent" if task.binary else "symmetric",
        "split_seed": split_seed, "seq_len": T, "layers": L1, "sites": L1 * T,
        "informative_sites": int(star.sum()), "star": star.tolist(),
        "pairs": {"fit": n_fit, "val": n_val, "eval": n_ev}, "usable_pair_fraction": kept,
        "effects": g.tolist(), "scores": {k: np.nan_to_num(v).tolist() for k, v in maps.items()},
        "methods": scored, "bootstrap": boot, "recovery": recovery,
        "alphas": alphas, "val_table": table.tolist(),
        "s2": {"layer": s2_layer, "alpha": s2_alpha, "metric_history": history},
        "compute": {"costs": costs, "ratios": ratios, "stages": ledger.as_dicts(),
                    "timed": rep > 0},
    }


def _draws(n, n_boot, seed):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, n[0], n[0]), rng.integers(0, n[1], n[1])) for _ in range(n_boot)]


def bootstrap(settings, fit_dp, fit, ev, diffs, grads, raw, m_clean, m_corrupt, star, seed):
    """R (|a| ranking, S*) of the cheap methods and of random over resamples of D_fit and
    D_eval; each draw refits v_l, the class vectors and a fresh random-vector control."""
    out = {m: [] for m in M.CHEAP + ("random",)}
    gen = torch.Generator().manual_seed(10_000 + seed)
    for fi, ei in _draws((len(fit), len(ev)), settings["n_boot"], seed):
        fi_t, ei_t = torch.as_tensor(fi), torch.as_tensor(ei)
        g = effects(raw[ei_t], m_clean[ei_t], m_corrupt[ei_t])
        maps, _ = score_maps(fit_dp[fi_t], fit.answer[fi_t], diffs[ei_t], grads[ei_t],
                             ev.answer[ei_t], gen)
        gs = g[star]
        for name, a in maps.items():
            out[name].append(F.measures(a[star], gs)["R"])
        out["random"].append(F.random_R(gs))
    return out


def bootstrap_heavy(settings, model, fit, val, ev, fit_dp, diffs, raw, m_clean, m_corrupt,
                    star, seed, device, val_base):
    """The methods that need steered forwards (S1-exact, its control, S2) and the
    intervention recovery, over ``n_boot_heavy`` resamples: each refits v_l, re-chooses
    alpha (and S2's layer) on D_val and reruns the steered forwards."""
    out = {"S1-exact": [], "S1-exact-randvec": [], "S2": [], "recovery_top1": [],
           "recovery_top5pct": []}
    gen = torch.Generator().manual_seed(20_000 + seed)
    L1 = diffs.shape[1]
    for fi, ei in _draws((len(fit), len(ev)), settings["n_boot_heavy"], 50_000 + seed):
        fi_t, ei_t = torch.as_tensor(fi), torch.as_tensor(ei)
        fit_b = fit.select(fi_t)
        v = M.fit_vectors(fit_dp[fi_t])
        table = M.val_recovery_table(model, val, v, device, base=val_base)
        alphas = M.choose_alphas(table)
        g = effects(raw[ei_t], m_clean[ei_t], m_corrupt[ei_t])
        gs = g[star]
        # steered forwards once per distinct pair of the resample (about 63% of them),
        # then weighted by how often the resample drew it
        uniq, inv = torch.unique(ei_t, return_inverse=True)
        ev_u, base = ev.select(uniq), (m_clean[uniq], m_corrupt[uniq])
        exact = M.steered_effects(model, ev_u, v, alphas, star, device,
                                  base=base)[inv].mean(0).numpy()
        out["S1-exact"].append(F.measures(exact[star], gs)["R"])
        rand = M.steered_effects(model, ev_u, M.random_vectors(v, gen), alphas, star, device,
                                 base=base)[inv].mean(0).numpy()
        out["S1-exact-randvec"].append(F.measures(rand[star], gs)["R"])
        layer, alpha = M.choose_layer_alpha(table)
        v2, _ = M.optimise_s2(model, fit_b, layer, alpha, v[layer], settings["s2_steps"], device)
        s2 = M.projection(diffs[ei_t], v2.expand(L1, -1)).double().mean(0).numpy()
        out["S2"].append(F.measures(s2[star], gs)["R"])
        denominator = float((m_clean[ei_t] - m_corrupt[ei_t]).mean())
        rec = recovery_sets(g, star, exact, denominator)
        out["recovery_top1"].append(rec["top1"]["ratio"])
        out["recovery_top5pct"].append(rec["top5pct"]["ratio"])
    return out
