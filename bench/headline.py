"""Protocol v4's headline (docs/protocol.md): per task and family, every reading's R_pair
with its hierarchical interval, its paired differences over its random twin and over
prior-answer (each interval from the same resamples), the discriminative tasks, an
interval that also resamples tasks, and the verdict rule:

    a reading reproduces the paper's pair against a form of patching only when
    R_pair >= 0.88, its compute against that form <= 0.05, and both paired
    differences' intervals lie above 0.
"""
import numpy as np

from . import bootstrap as B
from .controls import PRIORS, TWINS

PAIR = "pair:"                      # the bootstrap keys of R_pair draws (bench.evaluate)
PAPER_R, COMPUTE_LIMIT = 0.88, 0.05
DISCRIMINATIVE_BELOW = 0.8          # prior-answer's R_pair under this: the task can tell
READINGS = tuple(TWINS)             # the steering readings the verdict judges
BASELINES = ("S1-class", "AtP", "norm")
ROWS = READINGS + BASELINES + PRIORS + ("random",) + tuple(TWINS.values())
FORMS = ("floor", "naive_batched")


def keys():
    """Every bootstrap key the v4 numbers read (drawn with v3's in one paired call)."""
    return [PAIR + name for name in ROWS]


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def task_v4(task_runs, draws):
    """One task's v4 numbers from its runs and its hierarchical draws (``draws``: key ->
    (n_draws,) array, the same picks for every key)."""
    out = {"answer_column_share": _mean([r["v4"]["answer_column_share"] for r in task_runs]),
           "top3_share": _mean([r["v4"]["top3_share"] for r in task_runs]), "rows": {}}
    for name in ROWS:
        point = _mean([r["v4"]["R_pair"].get(name) for r in task_runs])
        R = _mean([r["v4"]["R"][name] if name in r["v4"]["R"] else
                   r["methods"][name]["abs"]["R"] for r in task_runs]) \
            if name != "random" else _mean([r["methods"]["random"]["abs"]["R"]
                                            for r in task_runs])
        out["rows"][name] = dict(B.interval(draws[PAIR + name], point), R_pair=point, R=R)
    for name in ROWS:
        out["rows"][name].update(differences(out["rows"], name, {
            k: draws[PAIR + k] for k in ROWS}))
    out["discriminative"] = bool(out["rows"]["prior-answer"]["R_pair"] < DISCRIMINATIVE_BELOW)
    return out


def differences(rows, name, draws):
    """R_pair(name) - R_pair(its twin) and - R_pair(prior-answer), each with the interval
    of the same draws' differences (paired)."""
    out = {}
    for label, other in (("vs_twin", TWINS.get(name)), ("vs_prior", "prior-answer")):
        if other is None or other == name:
            continue
        point = rows[name]["R_pair"] - rows[other]["R_pair"]
        out[label] = dict(B.interval(np.asarray(draws[name]) - np.asarray(draws[other]),
                                     point), value=point)
    return out


def task_resampled(task_draws, n_draws, seed):
    """Draw b: the mean of draw b over tasks drawn with replacement (how much the
    headline rests on this task set)."""
    names = sorted(task_draws)
    rng = np.random.default_rng(seed)
    stacked = np.vstack([np.asarray(task_draws[n], dtype=np.float64) for n in names])
    picks = rng.integers(0, len(names), (stacked.shape[1], len(names)))
    with np.errstate(invalid="ignore"):
        return np.nanmean(stacked[picks, np.arange(stacked.shape[1])[:, None]], 1)


def family_v4(tasks, names, seed):
    """The family's rows: mean over its tasks, hierarchical interval (tasks fixed) and
    one that also resamples tasks; paired differences from the combined draws."""
    rows, combined = {}, {}
    for name in ROWS:
        per_task = {n: np.asarray(tasks[n]["draws"][PAIR + name], dtype=np.float64)
                    for n in names}
        combined[name] = B.combine(list(per_task.values()))
        point = _mean([tasks[n]["v4"]["rows"][name]["R_pair"] for n in names])
        resampled = B.interval(task_resampled(per_task, len(combined[name]), seed), point)
        rows[name] = dict(B.interval(combined[name], point), R_pair=point,
                          R=_mean([tasks[n]["v4"]["rows"][name]["R"] for n in names]),
                          ci95_tasks_resampled=resampled["ci95"],
                          outside_tasks_resampled=resampled["outside"])
    for name in ROWS:
        rows[name].update(differences(rows, name, combined))
        compute = tasks[names[0]]["methods"].get(_priced_as(name), {}).get("compute")
        if compute is not None:
            rows[name]["compute"] = {
                k: _mean([tasks[n]["methods"][_priced_as(name)]["compute"][k] for n in names])
                for k in compute}
    return {"tasks": names, "rows": rows}


def _priced_as(name):
    """A twin is priced as its reading; priors cost nothing."""
    return name.split("~")[0]


def verdict(family):
    """v4's rule per reading and form (counted and amortised), with what fails."""
    out = []
    for name in READINGS + BASELINES:
        e = family["rows"][name]
        row = {"method": name, "kind": "steering" if name in READINGS else "baseline",
               "R_pair": e["R_pair"], "ci95": e["ci95"], "outside": e["outside"],
               "vs_twin": e.get("vs_twin"), "vs_prior": e.get("vs_prior")}
        fails_always = []
        if not (np.isfinite(e["R_pair"]) and e["R_pair"] >= PAPER_R):
            fails_always.append("R_pair < 0.88")
        twin = e.get("vs_twin")
        if twin is None:
            fails_always.append("no random twin (not a steering reading)")
        elif not (twin["ci95"][0] is not None and twin["ci95"][0] > 0):
            fails_always.append("does not beat its random twin")
        prior = e.get("vs_prior")
        if not (prior and prior["ci95"][0] is not None and prior["ci95"][0] > 0):
            fails_always.append("does not beat prior-answer")
        for form in FORMS:
            for kind in ("ratio", "ratio_amortised"):
                c = (e.get("compute") or {}).get(f"{kind}_{form}", float("nan"))
                fails = list(fails_always)
                if not (np.isfinite(c) and c <= COMPUTE_LIMIT):
                    fails.append(f"compute {c:.3f} > 0.05")
                row[f"{kind}_{form}"] = c
                row[f"holds_{kind}_{form}"] = not fails
                row[f"fails_{kind}_{form}"] = fails
        row["forward_equivalents_per_pair"] = (e.get("compute") or {}).get(
            "forward_equivalents_per_pair")
        out.append(row)
    return out


def summarize_v4(tasks, families, seed):
    """{tasks, discriminative, families, verdict}: ``tasks`` from bench.aggregate (each
    with its "v4" block and draws), ``families``: {name: [task names]} of the headline
    basis (built here from the discriminative tasks)."""
    discriminative = [n for n, t in tasks.items() if t["v4"]["discriminative"]
                      and t["headline"]]
    basis = discriminative or [n for n, t in tasks.items() if t["headline"]] or list(tasks)
    fams = {fam: [n for n in members if n in basis] for fam, members in families.items()}
    fams = {"all": basis, **{k: v for k, v in fams.items() if v}}
    per_family = {fam: family_v4(tasks, names, seed + i)
                  for i, (fam, names) in enumerate(fams.items())}
    return {"discriminative_tasks": discriminative,
            "headline_basis": "discriminative" if discriminative else "every task (none is "
                              "discriminative: prior-answer's R_pair >= 0.8 on each)",
            "families": per_family,
            "verdict": {fam: verdict(f) for fam, f in per_family.items()}}


def counted(n, noun):
    """'1 task', '4 tasks': a count as the report and the plots write it."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
