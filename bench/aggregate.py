"""From runs (task x training seed x split seed) to the benchmark's numbers:
per task and method, per family, the headlines, each with its interval and its
spread over seeds (docs/protocol.md v2: a single seed is never the headline).

Intervals: every run carries bootstrap draws of R (D_fit and D_eval resampled,
vectors refit). Draw b of a task is the mean over that task's runs of their draw
b; draw b of a headline is the mean over tasks of their draw b; the interval is
the 2.5-97.5 percentile of those draws. Spread: the headline computed per
(training seed, split seed) combination, then its mean, sd and range.
"""
from collections import defaultdict

import numpy as np

from . import faithfulness as F
from .methods import METHODS
from .tasks import FAMILIES

MEASURES = ("R", "R_prime", "R_skill", "spearman", "top10_recall")
COST_KEYS = ("floor_flops", "counted_flops", "analytic_flops", "seconds")


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _nums(values):
    """A list of numbers from JSON (None = NaN) as a float array."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _draws_mean(lists):
    """Elementwise mean of equally long draw lists (None = undefined draws skipped)."""
    lists = [x for x in lists if x]
    if not lists:
        return []
    n = min(len(x) for x in lists)
    out = []
    for b in range(n):
        vals = [x[b] for x in lists if x[b] is not None and np.isfinite(x[b])]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def by_task(runs):
    groups = defaultdict(list)
    for r in runs:
        groups[r["task"]].append(r)
    return dict(groups)


def patching_forms(run):
    """S1-proj's analytic cost over each form of patching (naive-batched, prefix-reuse,
    floor), on the sites that differ from the base run (S* and the endpoint sites)."""
    import transformers as T
    from .compute import patching_forms_flops
    cfg = T.LlamaConfig(**run["model"]["config"])
    star = np.asarray(run["star"], bool)
    L1, seq = star.shape
    differ = star.copy()
    differ[L1 - 1, seq - 1] = True
    differ[0, np.argwhere(star.any(0)).min() if star.any() else 0] = True
    sites = [tuple(x) for x in np.argwhere(differ)]
    forms = patching_forms_flops(cfg, seq, run["pairs"]["eval"], sites)
    s1 = run["compute"]["costs"]["S1-proj"]["analytic_flops"]
    return {k: s1 / v for k, v in forms.items()}


def task_summary(task_runs):
    """Per method: mean over the task's runs of every measure, seed sd/range, the
    bootstrap draws (seed-averaged) and their interval; compute ratios; recovery."""
    out = {"family": task_runs[0]["family"], "runs": len(task_runs),
           "informative_sites": _mean([r["informative_sites"] for r in task_runs]),
           "sites": task_runs[0]["sites"], "methods": {}}
    for m in METHODS:
        entry = {}
        for mode in ("abs", "signed"):
            for key in MEASURES:
                entry[f"{key}_{mode}" if mode == "signed" else key] = _mean(
                    [r["methods"][m][mode].get(key) for r in task_runs])
        Rs = _nums([r["methods"][m]["abs"]["R"] for r in task_runs])
        entry.update(R_sd=float(np.nanstd(Rs, ddof=1)) if len(Rs) > 1 else 0.0,
                     R_min=float(np.nanmin(Rs)), R_max=float(np.nanmax(Rs)),
                     v1_R=_mean([r["methods"][m]["v1_R"] for r in task_runs]),
                     cap=np.nanmean([_nums(r["methods"][m]["abs"]["cap"]) for r in task_runs],
                                    0).tolist())
        draws = _draws_mean([r["bootstrap"].get(m, []) for r in task_runs])
        entry["draws"] = draws
        entry["R_ci95"] = F.percentile_interval(draws)
        entry["boot_samples"] = len(draws)
        entry["compute"] = {k: _mean([r["compute"]["ratios"][m][k] for r in task_runs
                                      if k != "seconds" or r["compute"]["timed"]])
                            for k in COST_KEYS}
        out["methods"][m] = entry
    for mode, key in (("abs", "R"), ("signed", "R_signed")):  # R'' from the task's means
        norm = out["methods"]["norm"][key]
        for m in METHODS:
            out["methods"][m]["R_skill" if mode == "abs" else "R_skill_signed"] = F.skill(
                out["methods"][m][key], norm)
    if all("model" in r for r in task_runs):
        forms = [patching_forms(r) for r in task_runs]
        out["s1_proj_vs_patching_forms"] = {k: _mean([f[k] for f in forms]) for k in forms[0]}
    rec = {}
    for label in ("top1", "top5pct"):
        ratios = [r["recovery"][label]["ratio"] for r in task_runs]
        defined = [x for x in ratios if x is not None]
        draws = _draws_mean([r["bootstrap"].get(f"recovery_{label}", []) for r in task_runs])
        rec[label] = {"ratio": _mean(defined) if defined else None,
                      "defined_runs": len(defined), "runs": len(ratios),
                      "sum_g": _mean([r["recovery"][label]["sum_g"] for r in task_runs]),
                      "ci95": F.percentile_interval(draws) if draws else [None, None]}
    out["recovery"] = rec
    return out


def _headline(tasks, names, method, key="R"):
    """Mean over ``names`` of a task-level entry, with its interval from the draws."""
    vals = [tasks[n]["methods"][method][key] for n in names]
    draws = _draws_mean([tasks[n]["methods"][method]["draws"] for n in names])
    return {"value": _mean(vals), "ci95": F.percentile_interval(draws) if key == "R" else None,
            "tasks": len(names)}


def seed_spread(runs, names, method="S1-proj"):
    """The headline per (training seed, split seed) combination: mean, sd, range."""
    combos = defaultdict(dict)
    for r in runs:
        if r["task"] in names:
            combos[(r.get("train_seed", 0), r["split_seed"])][r["task"]] = \
                r["methods"][method]["abs"]["R"]
    values = [np.mean(list(v.values())) for v in combos.values() if len(v) == len(names)]
    if not values:
        return None
    return {"combinations": len(values), "mean": float(np.mean(values)),
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "min": float(np.min(values)), "max": float(np.max(values))}


def summarize(runs):
    tasks = {name: task_summary(rs) for name, rs in by_task(runs).items()}
    families = {"all": list(tasks)}
    for fam, members in FAMILIES.items():
        present = [n for n in members if n in tasks]
        if present:
            families[fam] = present
    per_family = {}
    for fam, names in families.items():
        per_family[fam] = {
            "tasks": names,
            "methods": {m: dict(
                _headline(tasks, names, m),
                R_signed=_mean([tasks[n]["methods"][m]["R_signed"] for n in names]),
                R_prime=_mean([tasks[n]["methods"][m]["R_prime"] for n in names]),
                R_skill=F.skill(  # from the family's means (stable where norm is near 1)
                    _mean([tasks[n]["methods"][m]["R"] for n in names]),
                    _mean([tasks[n]["methods"]["norm"]["R"] for n in names])),
                spearman=_mean([tasks[n]["methods"][m]["spearman"] for n in names]),
                top10_recall=_mean([tasks[n]["methods"][m]["top10_recall"] for n in names]),
                v1_R=_mean([tasks[n]["methods"][m]["v1_R"] for n in names]),
                cap=np.nanmean([_nums(tasks[n]["methods"][m]["cap"]) for n in names],
                               0).tolist(),
                cap_se=(np.nanstd([_nums(tasks[n]["methods"][m]["cap"]) for n in names], 0,
                                  ddof=1)
                        / np.sqrt(len(names))).tolist() if len(names) > 1 else
                [0.0] * len(F.K_FRACTIONS),
                compute={k: _mean([tasks[n]["methods"][m]["compute"][k] for n in names])
                         for k in COST_KEYS},
                seeds=seed_spread(runs, names, m))
                for m in METHODS},
        }
    headline_all = per_family["all"]["methods"]["S1-proj"]
    headline = {
        "faithfulness_ratio": headline_all["value"],
        "faithfulness_ratio_ci95": headline_all["ci95"],
        "faithfulness_ratio_seeds": headline_all["seeds"],
        "faithfulness_ratio_v1": headline_all["v1_R"],
        "faithfulness_ratio_by_family": {f: v["methods"]["S1-proj"]["value"]
                                         for f, v in per_family.items()},
        "compute_ratio_flops": headline_all["compute"]["floor_flops"],
        "compute_ratio_counted_flops": headline_all["compute"]["counted_flops"],
        "compute_ratio_time": headline_all["compute"]["seconds"],
        "compute_ratio_vs_patching_forms": {
            k: _mean([t["s1_proj_vs_patching_forms"][k] for t in tasks.values()
                      if "s1_proj_vs_patching_forms" in t])
            for k in ("naive_batched", "prefix_reuse", "floor")},
    }
    return {"headline": headline, "families": per_family, "tasks": tasks,
            "stage_agreement": stage_agreement(runs)}


def stage_agreement(runs):
    """Largest |counted / analytic - 1| per stage name over all runs (docs/protocol.md:
    FlopCounterMode and the analytic count must agree within 25% per stage)."""
    worst = defaultdict(float)
    for r in runs:
        for s in r["compute"]["stages"]:
            if s["analytic_flops"]:
                worst[s["name"]] = max(worst[s["name"]],
                                       abs(s["counted_flops"] / s["analytic_flops"] - 1))
    return {name: {"max_relative_gap": gap, "within_25pct": gap <= 0.25}
            for name, gap in worst.items()}
