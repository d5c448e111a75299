"""The attribution benchmark of PROTOCOL.md: patching vs steering faithfulness and compute.

    steerops bench attribution --quick            # all 12 tasks, CPU, a few minutes
    steerops bench attribution --tasks ioi sorting --device cuda --out results/attr

Headline numbers (printed and saved exactly with these definitions):
- faithfulness ratio = mean over tasks of R_S1, where R = mean over k in
  {1, 2, 5, 10, 20, 50}% of |S| of Cap(k) (patching itself scores 1);
- compute ratio = steering cost (S1: the D_fit and D_eval cache passes) /
  patching cost in its cheapest correct form (clean and corrupt runs, then per
  site only what differs from the corrupt run: identical sites skipped, the
  KV-cache prefix reused, blocks before the site skipped, LM head at the answer;
  steerops.reuse), in FLOPs counted by FlopCounterMode, in analytic FLOPs and
  in measured time.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

import steerops

from . import faithfulness as F
from .compute import (Ledger, analytic_forward_flops, meta_forward_flops, patching_floor_flops,
                      reuse_sweep_flops)
from .provenance import environment, save_results
from .tasks import TASKS
from .train import load_checkpoint

# realistic_pairs: eval pairs timed on GPT-2-small / on the 1.1B config (0 = not timed)
QUICK = dict(n_fit=32, n_val=16, n_eval=24, s2_steps=15, n_boot=100, repeats=1,
             realistic_pairs=2, realistic_pairs_1b=0)
FULL = dict(n_fit=128, n_val=64, n_eval=96, s2_steps=50, n_boot=1000, repeats=3,
            realistic_pairs=8, realistic_pairs_1b=1)
SEED = 1234
METHODS = ("S1", "S2", "AtP", "norm", "random")


# ----------------------------------------------------------------------------- data

def _metric_values(model, ids, answer, wrong):
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
    rows = torch.arange(ids.shape[0])
    return logits[rows, answer] - logits[rows, wrong], logits.argmax(-1)


def make_splits(task, model, n_fit, n_val, n_eval, seed, device):
    """Disjoint D_fit / D_val / D_eval of pairs the model gets right on clean with
    m(clean) - m(corrupt) > 1 (PROTOCOL.md); returns (splits, kept fraction)."""
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


# ----------------------------------------------------------------------------- methods

def _site_diffs(model, pairs, device):
    """(h(clean) - h(corrupt)) at every site: (pairs, L+1, T, D)."""
    c = steerops.cache_activations(model, pairs.clean.to(device))
    x = steerops.cache_activations(model, pairs.corrupt.to(device))
    return (c.acts - x.acts).float(), x.acts.float()


def s1_vectors(diffs, contrast):
    """v_l = E_fit[h_l,p*(clean) - h_l,p*(corrupt)] at each pair's contrast position."""
    rows = torch.arange(diffs.shape[0])
    return diffs[rows, :, contrast.to(diffs.device)].mean(0)  # (L+1, D)


def projection_scores(diffs, vectors):
    """Per pair: (h_s(clean) - h_s(corrupt)) . u_l * ||v_l||: (pairs, L+1, T).
    ``vectors`` (L+1, D) (one per layer) or (D,) (one for every layer)."""
    v = vectors if vectors.dim() == 2 else vectors.expand(diffs.shape[1], -1)
    norm = v.norm(dim=-1).clamp_min(1e-12)
    return torch.einsum("nltd,ld->nlt", diffs, v / norm[:, None]) * norm[None, :, None]


def contrast_mask(pairs):
    mask = torch.zeros_like(pairs.clean, dtype=torch.bool)
    mask[torch.arange(len(pairs)), pairs.contrast] = True
    return mask


def choose_layer(model, val, vectors, device):
    """l*: the layer whose S1 vector, added at the contrast positions, moves the
    corrupt D_val prompts furthest toward clean (never uses patching results)."""
    metric = steerops.logit_diff(val.answer.to(device), val.wrong.to(device))
    every = torch.arange(len(val), device=device)
    with torch.no_grad():
        m_clean = metric(model(val.clean.to(device)).logits, every)
        m_corrupt = metric(model(val.corrupt.to(device)).logits, every)
    mask = contrast_mask(val).to(device)
    recovery = []
    for layer in range(vectors.shape[0]):
        with steerops.Steering(model, layer, vectors[layer], 1.0, positions=mask), \
                torch.no_grad():
            m = metric(model(val.corrupt.to(device)).logits, every)
        recovery.append(F.recovery(m.cpu(), m_clean.cpu(), m_corrupt.cpu()))
    return int(np.argmax(recovery)), recovery


def steering_recovery(model, ev, sites, vectors, fit_diffs, fit_corrupt, device):
    """Per top site: (m(corrupt + a ||h|| u at the site) - m(corrupt)) / (m(clean) - m(corrupt)),
    with u = the S1 direction of that layer and a = E_fit[(h_clean - h_corrupt).u] /
    E_fit[||h_corrupt||] at that site (so the added term matches the mean contrast)."""
    metric = steerops.logit_diff(ev.answer.to(device), ev.wrong.to(device))
    every = torch.arange(len(ev), device=device)
    with torch.no_grad():
        m_clean = metric(model(ev.clean.to(device)).logits, every)
        m_corrupt = metric(model(ev.corrupt.to(device)).logits, every)
    out = []
    for layer, pos in sites:
        v = vectors[layer]
        u = v / v.norm()
        a = float((fit_diffs[:, layer, pos] @ u).mean() / fit_corrupt[:, layer, pos].norm(dim=-1)
                  .mean().clamp_min(1e-12))
        mask = torch.zeros_like(ev.corrupt, dtype=torch.bool)
        mask[:, pos] = True
        with steerops.Steering(model, layer, v, a, mode="norm_scaled", positions=mask.to(device)), \
                torch.no_grad():
            m = metric(model(ev.corrupt.to(device)).logits, every)
        out.append(F.recovery(m.cpu(), m_clean.cpu(), m_corrupt.cpu()))
    return out


# ----------------------------------------------------------------------------- one task

def run_task(task, model, settings, device, progress=True):
    cfg = model.config
    T = task.seq_len
    L1 = cfg.num_hidden_layers + 1
    n_sites = L1 * T
    splits, kept = make_splits(task, model, settings["n_fit"], settings["n_val"],
                               settings["n_eval"], SEED, device)
    fit, val, ev = splits["fit"], splits["val"], splits["eval"]
    ledger = Ledger(cfg)
    rep = settings["repeats"]
    n_ev, n_fit, n_val = len(ev), len(fit), len(val)
    metric = steerops.logit_diff(ev.answer.to(device), ev.wrong.to(device))

    # --- patching (ground truth): clean + corrupt runs, then each site's patched run in
    # its cheapest correct form (steerops.reuse: identical sites skipped, the KV-cache
    # prefix reused, blocks before the site skipped, LM head at the answer only); the
    # sweep's own batching (sized from its memory budget) is what users get
    sweep = ledger.run(
        "patching_sweep", lambda: steerops.patching_sweep(
            model, ev.clean.to(device), ev.corrupt.to(device), metric, progress=False),
        sequences=2 * n_ev + n_ev * n_sites, tokens=T, side="patching", repeats=rep,
        device=device)
    reuse = sweep.extra["reuse"]
    ledger.amend("patching_sweep", sequences=sweep.rows, analytic_override=reuse_sweep_flops(
        model.config, reuse, n_ev, T) if reuse["mode"] != "none" else None)
    raw = sweep.raw.cpu().double()
    m_clean, m_corrupt = sweep.clean_metric.cpu().double(), sweep.corrupt_metric.cpu().double()

    # --- S1: D_fit caches (every layer at once), D_eval caches
    fit_diffs, fit_corrupt = ledger.run(
        "S1_fit_caches", lambda: _site_diffs(model, fit, device), sequences=2 * n_fit,
        tokens=T, lm_head=False, side="steering", repeats=rep, device=device)
    vectors = s1_vectors(fit_diffs, fit.contrast)
    ev_diffs, _ = ledger.run(
        "eval_caches", lambda: _site_diffs(model, ev, device), sequences=2 * n_ev, tokens=T,
        lm_head=False, side="steering", repeats=rep, device=device)
    per_pair = {"S1": projection_scores(ev_diffs, vectors).cpu().double()}

    # --- S2: layer chosen on D_val, vector optimised through the fused op on D_fit
    l_star, val_recovery = ledger.run(
        "S2_val_choice", lambda: choose_layer(model, val, vectors, device),
        sequences=(L1 + 2) * n_val, tokens=T, side="steering_s2", device=device)
    fit_metric = steerops.logit_diff(fit.answer.to(device), fit.wrong.to(device))
    v_star, history = ledger.run(
        "S2_optimise", lambda: steerops.vectors.optimize_vector(
            model, fit.corrupt.to(device), l_star, vectors[l_star].to(device), fit_metric,
            steps=settings["s2_steps"], lr=0.05, positions=contrast_mask(fit).to(device)),
        sequences=settings["s2_steps"] * n_fit, tokens=T, backward=True, side="steering_s2",
        device=device)
    per_pair["S2"] = projection_scores(ev_diffs, v_star.detach().cpu().float()).double()

    # --- baselines: AtP (2 forward + 1 backward), ||diff||, random (expected)
    atp = ledger.run(
        "AtP", lambda: steerops.attribution_patching(model, ev.clean.to(device),
                                                     ev.corrupt.to(device), metric),
        sequences=n_ev, backward=True, extra_forwards=n_ev, tokens=T, side="atp",
        device=device)  # corrupt forward + backward, clean forward
    per_pair["AtP"] = atp.raw.cpu().double()
    per_pair["norm"] = ev_diffs.norm(dim=-1).cpu().double()

    # --- faithfulness
    g = ((raw.mean(0) - m_corrupt.mean()) / (m_clean - m_corrupt).mean()).numpy()
    scores = {k: v.mean(0).numpy() for k, v in per_pair.items()}
    results = {m: F.summarize(scores[m].ravel(), g.ravel()) for m in scores}
    R_rand = F.random_R(g.ravel())
    results["random"] = {"R": R_rand, "R_prime": 0.0, "spearman": float("nan"),
                         "top10_recall": float("nan"),
                         "cap": [F.expected_random_capture(g.ravel(), f) for f in F.K_FRACTIONS]}
    for name in results:
        results[name]["R_ci95"] = F.bootstrap_interval(
            lambda idx, name=name: _boot_R(name, idx, raw, m_clean, m_corrupt, per_pair),
            n_ev, settings["n_boot"], seed=SEED)

    # --- intervention recovery at the S1 top 10% sites
    k = F.top_k_count(n_sites, 0.10)
    top = np.argsort(-scores["S1"].ravel(), kind="stable")[:k]
    sites = [(int(i // T), int(i % T)) for i in top]
    steer_rec = steering_recovery(model, ev, sites, vectors.to(device), fit_diffs, fit_corrupt,
                                  device)
    patch_rec = [float(g[l, p]) for l, p in sites]

    # --- compute
    steer = ledger.totals("steering")
    s2 = ledger.totals("steering_s2")
    patch = ledger.totals("patching")
    atp_tot = ledger.totals("atp")
    ratio = {key: steer[key] / patch[key] if patch[key] else float("nan")
             for key in ("counted_flops", "analytic_flops", "seconds")}
    ratio_s2 = {key: (steer[key] + s2[key]) / patch[key] if patch[key] else float("nan")
                for key in ("counted_flops", "analytic_flops", "seconds")}
    return {
        "task": task.name, "binary": task.binary, "seq_len": T, "layers": L1,
        "sites": n_sites, "pairs": {"fit": n_fit, "val": n_val, "eval": n_ev},
        "usable_pair_fraction": kept, "effects": g.tolist(),
        "scores": {m: scores[m].tolist() for m in scores}, "methods": results,
        "s2": {"layer": l_star, "val_recovery": val_recovery, "metric_history": history},
        "recovery": {"sites": sites, "steering": steer_rec, "patching": patch_rec,
                     "ratio_of_means": float(np.mean(steer_rec) / np.mean(patch_rec))
                     if np.mean(patch_rec) != 0 else float("nan")},
        "compute": {"steering_S1": steer, "steering_S2_extra": s2, "patching": patch,
                    "atp": atp_tot, "ratio_S1": ratio, "ratio_S1_plus_S2": ratio_s2,
                    "stages": ledger.as_dicts()},
    }


def _boot_R(method, idx, raw, m_clean, m_corrupt, per_pair):
    denom = (m_clean[idx] - m_corrupt[idx]).mean()
    g = ((raw[idx].mean(0) - m_corrupt[idx].mean()) / denom).numpy().ravel()
    if method == "random":
        return F.random_R(g)
    return F.faithfulness_R(per_pair[method][idx].mean(0).numpy().ravel(), g)


# ----------------------------------------------------------------------------- compute curves

def compute_curves(config, T, n_fit, n_eval, max_sites):
    """Analytic compute ratio (S1 / patching) vs |S| and vs number of eval pairs."""
    head = analytic_forward_flops(config, T, True)
    cache = analytic_forward_flops(config, T, False)
    steer = (2 * n_fit + 2 * n_eval) * cache

    L1 = config.num_hidden_layers + 1
    base = 2 * analytic_forward_flops(config, T)
    per_site = (patching_floor_flops(config, T, 1) - base) / (L1 * T)  # mean, cheapest form

    def patch(sites, n):
        return n * (base + sites * per_site)

    sites = sorted({1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, max_sites})
    return {"max_sites": max_sites, "sites": sites,
            "ratio_vs_sites": [steer / patch(s, n_eval) for s in sites],
            "pairs": [8, 16, 32, 64, 128, 256],
            "ratio_vs_pairs": [(2 * n_fit + 2 * n) * cache / patch(max_sites, n)
                               for n in [8, 16, 32, 64, 128, 256]]}


def realistic(settings, device, T=10, progress=True):
    """The same protocol costs on randomly initialised models of realistic size:
    FLOPs on the meta device (GPT-2-small and a ~1B Llama-style config) and the
    measured time of both sides on GPT-2-small (random tokens, same |S| and pairs)."""
    import transformers as Tf
    configs = {
        "gpt2-small": Tf.GPT2Config(),
        "llama-1.1b": Tf.LlamaConfig(hidden_size=2048, intermediate_size=5632,
                                     num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, vocab_size=32000),
    }
    out = {}
    for name, cfg in configs.items():
        L1 = (getattr(cfg, "num_hidden_layers", None) or cfg.n_layer) + 1
        sites = L1 * T
        fwd = meta_forward_flops(lambda cfg=cfg: Tf.AutoModelForCausalLM.from_config(cfg), T)
        n_fit, n_eval = settings["n_fit"], settings["n_eval"]
        steer = (2 * n_fit + 2 * n_eval) * fwd
        plain = n_eval * (2 + sites) * fwd
        # the cheapest correct form (what patching_sweep runs), corrupted column 2 as timed
        patch = patching_floor_flops(cfg, T, n_eval, first_diff=2)
        out[name] = {"sites": sites, "tokens": T, "forward_flops_meta": fwd,
                     "patching_flops_plain": plain, "patching_flops_floor": patch,
                     "flops_ratio_S1_plain": steer / plain,
                     "analytic_forward_flops": analytic_forward_flops(cfg, T),
                     "flops_ratio_S1": steer / patch}
    # measured time of both sides, random tokens; D_fit as large as D_eval here
    pairs = {"gpt2-small": settings["realistic_pairs"],
             "llama-1.1b": settings.get("realistic_pairs_1b", 0)}
    for name, n in pairs.items():
        out[name]["measured"] = None
        if n <= 0:
            continue
        torch.manual_seed(0)
        model = Tf.AutoModelForCausalLM.from_config(configs[name]).to(device).eval()
        out[name]["measured"] = _time_both_sides(model, n, T, out[name]["sites"], device,
                                                 progress)
        del model
    return out


def _time_both_sides(model, n, T, sites, device, progress):
    V = model.config.vocab_size
    clean = torch.randint(0, V, (n, T), device=device)
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 1) % V
    metric = steerops.logit_diff(torch.zeros(n, dtype=torch.long),
                                 torch.ones(n, dtype=torch.long))
    ledger = Ledger(model.config)
    ledger.run("patching_sweep", lambda: steerops.patching_sweep(
        model, clean, corrupt, metric, progress=progress),
        sequences=2 * n + n * sites, tokens=T, side="patching", device=device)
    ledger.run("S1_caches", lambda: [steerops.cache_activations(model, x)
                                     for x in (clean, corrupt, clean, corrupt)],
               sequences=4 * n, tokens=T, lm_head=False, side="steering", device=device)
    s, p = ledger.totals("steering"), ledger.totals("patching")
    return {"pairs": n, "device": str(device), "steering_seconds": s["seconds"],
            "patching_seconds": p["seconds"], "time_ratio_S1": s["seconds"] / p["seconds"],
            "counted_flops_ratio_S1": s["counted_flops"] / p["counted_flops"]}


# ----------------------------------------------------------------------------- reporting

def headline(results):
    tasks = results["tasks"]
    R_s1 = np.mean([t["methods"]["S1"]["R"] for t in tasks])
    flops = np.mean([t["compute"]["ratio_S1"]["counted_flops"] for t in tasks])
    secs = np.mean([t["compute"]["ratio_S1"]["seconds"] for t in tasks])
    return {"faithfulness_ratio": float(R_s1), "compute_ratio_flops": float(flops),
            "compute_ratio_time": float(secs)}


def markdown(results):
    h = results["headline"]
    env = results["environment"]
    lines = [
        f"**Faithfulness ratio = {h['faithfulness_ratio']:.3f}**: the mean over "
        f"{len(results['tasks'])} tasks of R_S1, where R = mean over k in "
        "{1, 2, 5, 10, 20, 50}% of |S| of Cap(k) (patching itself scores 1; the paper "
        "claims 0.88).",
        f"**Compute ratio = {h['compute_ratio_flops']:.3f}** (FLOPs, FlopCounterMode) / "
        f"{h['compute_ratio_time']:.3f} (time, {env['device']}): steering S1 (D_fit + D_eval "
        "cache passes) over patching in its cheapest correct form (clean + corrupt runs, then "
        "per site only what differs from the corrupt run: identical sites skipped, KV-cache "
        "prefix reused, blocks before the site skipped, LM head at the answer; "
        "patching_sweep(reuse='full')), mean over tasks (the paper claims ~0.04).",
        "",
        "| task | sites | eval pairs | R S1 [95% CI] | R S2 | R AtP | R norm | R random | R' S1 "
        "| Spearman S1 | top-10% recall S1 | recovery steer/patch | FLOPs ratio | time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in results["tasks"]:
        m = t["methods"]
        lo, hi = m["S1"]["R_ci95"]
        c = t["compute"]["ratio_S1"]
        lines.append(
            f"| {t['task']} | {t['sites']} | {t['pairs']['eval']} | {m['S1']['R']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] | {m['S2']['R']:.3f} | {m['AtP']['R']:.3f} | "
            f"{m['norm']['R']:.3f} | {m['random']['R']:.3f} | {m['S1']['R_prime']:.3f} | "
            f"{m['S1']['spearman']:.3f} | {m['S1']['top10_recall']:.2f} | "
            f"{t['recovery']['ratio_of_means']:.2f} | {c['counted_flops']:.3f} | "
            f"{c['seconds']:.3f} |")
    means = {m: np.mean([t["methods"][m]["R"] for t in results["tasks"]]) for m in METHODS}
    lines.append(f"| **mean** | | | **{means['S1']:.3f}** | {means['S2']:.3f} | "
                 f"{means['AtP']:.3f} | {means['norm']:.3f} | {means['random']:.3f} | | | | | "
                 f"**{h['compute_ratio_flops']:.3f}** | {h['compute_ratio_time']:.3f} |")
    real = results.get("realistic")
    if real:
        lines += ["", "Realistic-size configs (random init, |S| = (L+1) x 10 positions, same "
                  "pairs): FLOPs ratio S1/patching " + ", ".join(
                      f"{k}: {v['flops_ratio_S1']:.4f} (|S| = {v['sites']})"
                      for k, v in real.items()) + "."]
        for name, r in real.items():
            meas = r["measured"]
            if meas is None:
                lines.append(f"Time on {name}: not measured in this run (--quick).")
                continue
            lines.append(f"Measured time on {name} ({meas['device']}, {meas['pairs']} eval "
                         f"pairs): steering {meas['steering_seconds']:.2f} s vs patching "
                         f"{meas['patching_seconds']:.2f} s, ratio {meas['time_ratio_S1']:.4f}.")
    lines += ["", f"Run on {env['device']}; torch {env['torch']}, triton {env['triton']}, "
              f"transformers {env['transformers']}, commit {env['commit']}; settings "
              f"{json.dumps(results['settings'])}."]
    return "\n".join(lines)


def plots(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [100 * f for f in F.K_FRACTIONS]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        curve = np.nanmean([t["methods"][m]["cap"] for t in results["tasks"]], 0)
        ax.plot(ks, curve, marker="o", label=m)
    ax.set(xscale="log", xlabel="k (% of sites)", ylabel="Cap(k), mean over tasks",
           title="Capture of patching effect by top-k sites")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cap_curves.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    curves = results["curves"]
    axes[0].plot(curves["sites"], curves["ratio_vs_sites"], marker="o", label="analytic")
    measured = [(t["sites"], t["compute"]["ratio_S1"]["counted_flops"]) for t in results["tasks"]]
    axes[0].scatter(*zip(*measured), color="C1", label="counted (tasks)", zorder=3)
    for name, r in (results.get("realistic") or {}).items():
        axes[0].scatter([r["sites"]], [r["flops_ratio_S1"]], marker="x", s=60, label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="|S| (sites)",
                ylabel="compute ratio S1 / patching", title="compute ratio vs |S|")
    axes[0].legend(fontsize=8)
    axes[1].plot(curves["pairs"], curves["ratio_vs_pairs"], marker="o")
    axes[1].set(xscale="log", yscale="log", xlabel="eval pairs",
                ylabel="compute ratio S1 / patching",
                title=f"vs eval pairs (|S| = {curves['max_sites']})")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "compute_ratio.png"), dpi=120)
    plt.close(fig)

    shown = results["tasks"][:4]
    fig, axes = plt.subplots(2, len(shown), figsize=(3.2 * len(shown), 5), squeeze=False)
    for j, t in enumerate(shown):
        for i, (key, data) in enumerate((("patching g", t["effects"]),
                                         ("steering S1", t["scores"]["S1"]))):
            ax = axes[i, j]
            im = ax.imshow(np.asarray(data), aspect="auto", cmap="RdBu_r",
                           vmin=-np.abs(data).max(), vmax=np.abs(data).max())
            ax.set(title=f"{t['task']}: {key}", xlabel="position", ylabel="layer")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "heatmaps.png"), dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point

def run(tasks, *, quick=False, device="cpu", out_dir="results/attribution", progress=True,
        checkpoint_dir=None, with_realistic=True, settings=None):
    """Runs the benchmark; ``results.json`` is rewritten after every stage (each
    task, the curves, the realistic configs) with ``"complete": false`` and the
    stages done, so a failure late in the run loses nothing finished before it."""
    from tqdm.auto import tqdm
    settings = dict(settings or (QUICK if quick else FULL))
    env = environment()  # at the start: the commit the run's code came from
    device = torch.device(device)
    torch.manual_seed(SEED)
    os.makedirs(out_dir, exist_ok=True)
    per_task = []
    results = {"protocol": "PROTOCOL.md (steerops shared/)", "environment": env,
               "settings": dict(settings, seed=SEED, quick=quick),
               "checkpoints": checkpoint_dir or "shipped", "complete": False,
               "stages_done": [], "tasks": per_task}

    def stage_done(name):
        results["stages_done"].append(name)
        save_results(out_dir, "results", results)

    first_cfg = None
    for name in tqdm(tasks, desc="attribution benchmark", disable=not progress):
        kwargs = {} if checkpoint_dir is None else {"directory": checkpoint_dir}
        model, info = load_checkpoint(name, device=device, **kwargs)
        first_cfg = first_cfg or (model.config, TASKS[name].seq_len)
        result = run_task(TASKS[name], model, settings, device, progress)
        result["model"] = {"held_out_accuracy": info["held_out_accuracy"],
                           "train_steps": info["steps"], "seed": info["seed"]}
        per_task.append(result)
        stage_done(f"task:{name}")
    cfg, T = first_cfg
    results["curves"] = compute_curves(cfg, T, settings["n_fit"], settings["n_eval"],
                                       max_sites=(cfg.num_hidden_layers + 1) * 128)
    stage_done("curves")
    if with_realistic:
        results["realistic"] = realistic(settings, device, progress=progress)
        stage_done("realistic")
    results["headline"] = headline(results)
    results["complete"] = True
    table = markdown(results)
    save_results(out_dir, "results", results, table)
    plots(results, out_dir)
    return results, table


def build_parser():
    p = argparse.ArgumentParser(
        prog="steerops bench attribution",
        description="The PROTOCOL.md attribution benchmark: activation patching vs steering "
                    "vectors, faithfulness and compute, on the 12 shipped task models.")
    p.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS),
                   metavar="TASK", help=f"tasks to run (default: all): {', '.join(TASKS)}")
    p.add_argument("--quick", action="store_true",
                   help="fewer pairs and bootstrap samples (same protocol), about a minute on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default="results/attribution",
                   help="output folder for results.json, results.md and the plots "
                        "(default: results/attribution)")
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="folder of task checkpoints <task>.safetensors, e.g. from "
                        "python -m steerops.bench.train (default: the shipped ones)")
    p.add_argument("--no-realistic", action="store_true",
                   help="skip the GPT-2-small / 1B compute measurements")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    _, table = run(args.tasks, quick=args.quick, device=args.device, out_dir=args.out,
                   progress=not args.no_progress, checkpoint_dir=args.checkpoints,
                   with_realistic=not args.no_realistic)
    print(table)
    print(f"\nwrote {args.out}/results.json, results.md, cap_curves.png, compute_ratio.png, "
          f"heatmaps.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
