"""From runs (task x training seed x split seed) to the benchmark's numbers
(docs/protocol.md v3): per task and method, per family, the verdict table.

Point estimates are means over a task's runs, then over tasks. Intervals come from
the hierarchical bootstrap (``bench.bootstrap``): training seeds, split seeds, eval
pairs; each is printed with its bias and a flag where the point lies outside it.
The spread is the headline per (training seed, split seed) combination, over the
tasks present in it. A task whose |S*| < 10 is reported but left out of the
headlines.
"""
from collections import defaultdict

import numpy as np

from . import bootstrap as B
from . import headline as H
from .methods import METHODS
from .pricing import METHOD_STAGES
from .tasks import FAMILIES

MEASURES = ("R", "R_grid", "R_prime", "spearman", "top10_recall")
MIN_STAR = 10                      # docs/protocol.md v3: |S*| below this leaves the headline
PAPER_R, PAPER_COMPUTE = 0.88, 0.04
ABOUT = 1.25                       # "about 4%": at most 25% above it (0.05)
FORMS = ("floor", "naive_batched")
CAP_FRACTIONS = np.round(np.linspace(0.02, 0.5, 25), 4)  # k / |S*| of the plotted curves


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def by_task(runs):
    groups = defaultdict(list)
    for r in runs:
        groups[r["task"]].append(r)
    return dict(groups)


def cap_on_fractions(cap):
    """A Cap(k) curve (k = 1..ceil(|S*|/2)) read at k = ceil(f |S*|) for each plotted
    fraction f (so that tasks with different |S*| share an axis)."""
    cap = np.array([np.nan if c is None else c for c in cap], dtype=np.float64)
    n = 2 * cap.size
    if cap.size == 0:
        return [float("nan")] * len(CAP_FRACTIONS)
    k = np.clip(np.ceil(CAP_FRACTIONS * n).astype(int), 1, cap.size)
    return cap[k - 1].tolist()


def _compute(task_runs, m):
    costs = [r["compute"]["costs"][m] for r in task_runs]
    out = {f"{key}_{form}": _mean([c[key][form] for c in costs])
           for key in ("ratio", "ratio_amortised") for form in FORMS}
    out["ratio_counted_flops"] = _mean([c["ratio_counted_flops"] for c in costs])
    out["ratio_seconds"] = _mean([c["ratio_seconds"] for c in costs
                                  if c.get("ratio_seconds") is not None])
    out["peak_memory_mb"] = _mean([c["peak_memory_mb"] for c in costs])
    for key in ("forward_equivalents_per_pair", "forward_equivalents_per_pair_amortised"):
        out[key] = _mean([c.get(key) for c in costs])
    return out


def task_summary(task_runs, n_draws, seed):
    # v3's and v4's keys in one call: the same picks for every key (paired differences)
    keys = list(METHODS) + ["recovery_top1", "recovery_top5pct"] + H.keys()
    draws = B.task_draws(task_runs, keys, n_draws, seed)
    stars = [r["informative_sites"] for r in task_runs]
    out = {"family": task_runs[0]["family"], "runs": len(task_runs),
           "informative_sites": _mean(stars), "informative_sites_min": int(min(stars)),
           "informative_sites_v2": _mean([r["informative_sites_v2"] for r in task_runs]),
           "headline": min(stars) >= MIN_STAR, "sites": task_runs[0]["sites"],
           "even_share": _mean([r["even_share"] for r in task_runs]),
           "train_seeds": sorted({r.get("train_seed", 0) for r in task_runs}),
           "methods": {}, "draws": {k: v.tolist() for k, v in draws.items()}}
    for m in METHODS:
        entry = {}
        for mode in ("abs", "signed"):
            for key in MEASURES:
                entry[key if mode == "abs" else f"{key}_signed"] = _mean(
                    [r["methods"][m][mode].get(key) for r in task_runs])
        entry["v2_R"] = _mean([r["methods"][m]["v2_R"] for r in task_runs])
        Rs = [r["methods"][m]["abs"]["R"] for r in task_runs]
        entry.update(R_sd=float(np.nanstd(Rs, ddof=1)) if len(Rs) > 1 else 0.0,
                     R_min=float(np.nanmin(Rs)), R_max=float(np.nanmax(Rs)))
        entry["cap"] = np.nanmean([cap_on_fractions(r["methods"][m]["abs"]["cap"])
                                   for r in task_runs], 0).tolist()
        entry.update(B.interval(draws[m], entry["R"]))
        entry["compute"] = _compute(task_runs, m) if m in METHOD_STAGES else None
        out["methods"][m] = entry
    norm = out["methods"]["norm"]["R"]
    for m in METHODS:  # R'' from the task's means
        out["methods"][m]["R_skill"] = skill(out["methods"][m]["R"], norm)
    rec = {}
    for label in ("top1", "top5pct"):
        ratios = [r["recovery"][label]["ratio"] for r in task_runs]
        defined = [x for x in ratios if x is not None]
        rec[label] = dict(B.interval(draws[f"recovery_{label}"], _mean(defined)),
                          ratio=_mean(defined) if defined else None,
                          defined_runs=len(defined), runs=len(ratios),
                          sum_g=_mean([r["recovery"][label]["sum_g"] for r in task_runs]))
    out["recovery"] = rec
    out["v4"] = H.task_v4(task_runs, draws)
    return out


def skill(R, R_norm):
    if R_norm is None or not np.isfinite(R_norm) or R_norm > 0.99:
        return float("nan")
    return float((R - R_norm) / (1 - R_norm))


def seed_spread(runs, names, method):
    """The headline per (training seed, split seed) combination over the tasks present
    in it (a missing task never drops the combination): mean, sd, range."""
    combos = defaultdict(list)
    for r in runs:
        if r["task"] in names:
            # split seeds are nested per model: the combination is (training seed, the
            # split's index), the same draw position across tasks
            combos[(r.get("train_seed", 0), r.get("split_index", r["split_seed"]))].append(
                r["methods"][method]["abs"]["R"])
    values = [_mean(v) for v in combos.values()]
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return None
    return {"combinations": len(values), "mean": float(np.mean(values)),
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "min": float(np.min(values)), "max": float(np.max(values))}


def family_summary(runs, tasks, names):
    out = {"tasks": names, "methods": {}}
    for m in METHODS:
        point = _mean([tasks[n]["methods"][m]["R"] for n in names])
        draws = B.combine([np.asarray(tasks[n]["draws"][m], dtype=np.float64) for n in names])
        entry = dict(B.interval(draws, point), value=point, tasks=len(names),
                     seeds=seed_spread(runs, names, m))
        for key in ("R_grid", "R_signed", "R_prime", "spearman", "top10_recall", "v2_R"):
            entry[key] = _mean([tasks[n]["methods"][m][key] for n in names])
        entry["R_skill"] = skill(point, _mean([tasks[n]["methods"]["norm"]["R"] for n in names]))
        caps = np.array([tasks[n]["methods"][m]["cap"] for n in names], dtype=np.float64)
        entry["cap"] = np.nanmean(caps, 0).tolist()
        entry["cap_se"] = (np.nanstd(caps, 0, ddof=1) / np.sqrt(len(names))).tolist() \
            if len(names) > 1 else [0.0] * len(CAP_FRACTIONS)
        if m in METHOD_STAGES:
            entry["compute"] = {k: _mean([tasks[n]["methods"][m]["compute"][k] for n in names])
                                for k in tasks[names[0]]["methods"][m]["compute"]}
        out["methods"][m] = entry
    return out


def verdict(family):
    """Per reading: does R reach 0.88 and the compute about 4% (<= 0.05) against each form
    of patching, counted and amortised? The paper's pair holds for a reading against a
    form when both hold there."""
    rows = []
    for m, e in family["methods"].items():
        if e.get("compute") is None or m == "random":
            continue
        R, lo = e["value"], (e["ci95"] or [None])[0]
        row = {"method": m, "R": R, "ci95": e["ci95"], "bias": e["bias"],
               "outside": e["outside"], "R_reaches": bool(np.isfinite(R) and R >= PAPER_R),
               "ci_above": bool(lo is not None and lo >= PAPER_R)}
        for form in FORMS:
            for kind in ("ratio", "ratio_amortised"):
                c = e["compute"][f"{kind}_{form}"]
                row[f"{kind}_{form}"] = c
                row[f"holds_{kind}_{form}"] = bool(row["R_reaches"] and np.isfinite(c)
                                                    and c <= PAPER_COMPUTE * ABOUT)
        rows.append(row)
    return rows


def summarize(runs, n_draws=1000, seed=0, families=None):
    """Per task, per family (``families``: {name: task names}, default the task
    families) and the v4 verdict over the runs."""
    families_wanted = FAMILIES if families is None else families
    tasks = {name: task_summary(rs, n_draws, seed + i)
             for i, (name, rs) in enumerate(sorted(by_task(runs).items()))}
    headline_tasks = [n for n, t in tasks.items() if t["headline"]]
    left_out = [n for n, t in tasks.items() if not t["headline"]]
    # no task reaches |S*| >= 10 (the toy scale): report over every task, and say so
    basis = headline_tasks or list(tasks)
    families = {"all": basis}
    for fam, members in families_wanted.items():
        present = [n for n in members if n in basis]
        if present:
            families[fam] = present
    per_family = {fam: family_summary(runs, tasks, names) for fam, names in families.items()}
    return {"tasks": tasks, "families": per_family,
            "headline_tasks": headline_tasks, "left_out_small_star": left_out,
            "headline_rule_met": bool(headline_tasks),
            "verdict": {fam: verdict(f) for fam, f in per_family.items()},
            "v4": H.summarize_v4(tasks, families_wanted, seed),
            "stage_agreement": stage_agreement(runs), "memory": memory_by_stage(runs)}


def memory_by_stage(runs):
    """Peak memory per stage (MB above the level before it; CUDA allocator or CPU RSS):
    the mean and max over runs, and per task with its |S*| (how a stage grows with the
    number of scored sites)."""
    stages = defaultdict(list)
    per_task = defaultdict(lambda: defaultdict(list))
    for r in runs:
        for s in r["compute"]["stages"]:
            if s.get("peak_memory_mb") is not None:
                stages[s["name"]].append(s["peak_memory_mb"])
                per_task[r["task"]][s["name"]].append(s["peak_memory_mb"])
    star = {t: _mean([r["informative_sites"] for r in rs]) for t, rs in by_task(runs).items()}
    return {"stages": {k: {"mean_mb": _mean(v), "max_mb": float(max(v))}
                       for k, v in stages.items()},
            "by_task": {t: dict({k: _mean(v) for k, v in st.items()}, star=star[t])
                        for t, st in per_task.items()}}


def stage_agreement(runs):
    """Largest |counted / analytic - 1| per stage name over all runs (docs/protocol.md:
    FlopCounterMode and the analytic count of what ran must agree within 25%)."""
    worst = defaultdict(float)
    for r in runs:
        for s in r["compute"]["stages"]:
            if s["analytic_flops"]:
                worst[s["name"]] = max(worst[s["name"]],
                                       abs(s["counted_flops"] / s["analytic_flops"] - 1))
    return {name: {"max_relative_gap": gap, "within_25pct": gap <= 0.25}
            for name, gap in worst.items()}
