"""results.md's protocol-v4 part: the verdict table first (every reading's R_pair with
its interval, its paired differences over its random twin and over prior-answer, its
compute against both forms of patching, and which condition fails), then per task the
answer-column share, the priors and the twins, then every point outside its interval."""
import numpy as np

from .controls import PRIORS, TWINS
from .headline import BASELINES, DISCRIMINATIVE_BELOW, READINGS, counted


def _f(x, digits=3):
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _ci(e, key="ci95"):
    lo, hi = e.get(key) or (None, None)
    return "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"


def _diff(d):
    return "n/a" if not d else f"{d['value']:+.3f}{_ci(d)}"


def verdict_table(v4, family="all"):
    fam = v4["families"][family]
    lines = ["| reading | kind | R_pair [95% CI] | tasks resampled | R − twin | R − prior-answer "
             "| compute vs floor (counted / amortised) | vs naive-batched | fwd-equiv / pair "
             "| pair holds vs floor / naive | fails (counted, vs floor) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in v4["verdict"][family]:
        e = fam["rows"][row["method"]]
        lines.append(
            f"| {row['method']} | {row['kind']} | {_f(row['R_pair'])}{_ci(e)}"
            f"{' **outside**' if e.get('outside') else ''} | {_ci(e, 'ci95_tasks_resampled')} "
            f"| {_diff(row['vs_twin'])} | {_diff(row['vs_prior'])} "
            f"| {_f(row['ratio_floor'], 4)} / {_f(row['ratio_amortised_floor'], 4)} "
            f"| {_f(row['ratio_naive_batched'], 4)} / {_f(row['ratio_amortised_naive_batched'], 4)}"
            f" | {_f(row['forward_equivalents_per_pair'], 1)} "
            f"| {'yes' if row['holds_ratio_floor'] else 'no'} / "
            f"{'yes' if row['holds_ratio_naive_batched'] else 'no'} "
            f"| {'; '.join(row['fails_ratio_floor']) or 'none'} |")
    for name in PRIORS + ("random",) + tuple(TWINS.values()):
        e = fam["rows"][name]
        kind = "prior (free)" if name in PRIORS else "control"
        lines.append(f"| {name} | {kind} | {_f(e['R_pair'])}{_ci(e)} | "
                     f"{_ci(e, 'ci95_tasks_resampled')} | | | | | | | |")
    return lines


def sentence(v4):
    rows = v4["verdict"]["all"]
    holds = [(r["method"], form) for r in rows for form in ("floor", "naive_batched")
             if r[f"holds_ratio_{form}"] or r[f"holds_ratio_amortised_{form}"]]
    beats_twin = [r["method"] for r in rows if r["kind"] == "steering"
                  and r["vs_twin"] and (r["vs_twin"]["ci95"][0] or -1) > 0]
    beats_prior = [r["method"] for r in rows
                   if r["vs_prior"] and (r["vs_prior"]["ci95"][0] or -1) > 0]
    out = [("The paper's pair holds for: " + ", ".join(f"{m} (vs {f})" for m, f in holds)
            + ".")
           if holds else "**The paper's pair holds for no reading against any form of "
                         "patching** under v4's rule.",
           "Steering readings whose R_pair beats their random twin (interval above 0): "
           + (", ".join(beats_twin) or "none") + "; a reading that does not is not shown to "
           "owe its score to the steering vector.",
           "Rows whose R_pair beats prior-answer (interval above 0): "
           + (", ".join(beats_prior) or "none") + "."]
    return [" ".join(out), ""]


def task_table(results):
    lines = ["## Per task (v4): how positional is the ground truth", "",
             f"Discriminative: prior-answer's R_pair < {DISCRIMINATIVE_BELOW} (the task can "
             f"tell a method from a positional guess). Shares are of Σ|g| over S*.", "",
             "| task | family | discriminative | answer-column share | top-3 share | "
             "prior-answer | prior-path | random | "
             + " | ".join(READINGS + BASELINES) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(READINGS + BASELINES)]
    for name, t in results["tasks"].items():
        v = t["v4"]
        r = v["rows"]
        cells = [f"{_f(r[m]['R_pair'])} (twin {_f(r[TWINS[m]]['R_pair'])})"
                 if m in TWINS else _f(r[m]["R_pair"]) for m in READINGS + BASELINES]
        lines.append(f"| {name} | {t['family']} | {'yes' if v['discriminative'] else 'no'} "
                     f"| {_f(v['answer_column_share'])} | {_f(v['top3_share'])} "
                     f"| {_f(r['prior-answer']['R_pair'])} | {_f(r['prior-path']['R_pair'])} "
                     f"| {_f(r['random']['R_pair'])} | " + " | ".join(cells) + " |")
    return lines + [""]


ANSWER_COLUMN_SOLVED = 0.8  # more of Σ|g| than this in the answer column: solved there


def column_lines(results):
    """Says plainly which tasks' models solve them in the answer column, the multi-hop
    ones first: a multi-hop prompt asks for a chain, but the evidence is where g lies."""
    solved = {n: t["v4"]["answer_column_share"] for n, t in results["tasks"].items()
              if (t["v4"]["answer_column_share"] or 0) > ANSWER_COLUMN_SOLVED}
    hops = [n for n in solved if results["tasks"][n]["family"] == "multihop"]
    rest = [n for n in solved if n not in hops]
    named = lambda names: ", ".join(f"{n} ({_f(solved[n])})" for n in names)  # noqa: E731
    out = [f"**Solved in the answer column** (answer-column share of Σ|g| over S* above "
           f"{ANSWER_COLUMN_SOLVED}): " + (named(rest) or "no task") + "."]
    if any(t["family"] == "multihop" for t in results["tasks"].values()):
        out.append("Multi-hop tasks whose model still solves them in the answer column, not "
                   "along the chain the prompt lays out: " + (named(hops) or "none") + ".")
    return [" ".join(out), ""]


def outside_lines(results):
    """Every point estimate outside its own interval (tasks and families)."""
    found = []
    for name, t in results["tasks"].items():
        for row, e in t["v4"]["rows"].items():
            if e.get("outside"):
                found.append(f"{name} / {row} R_pair")
        for m, e in t["methods"].items():
            if e.get("outside"):
                found.append(f"{name} / {m} R (v3)")
    for fam, f in results["v4"]["families"].items():
        for row, e in f["rows"].items():
            if e.get("outside"):
                found.append(f"family {fam} / {row} R_pair")
            if e.get("outside_tasks_resampled"):
                found.append(f"family {fam} / {row} R_pair (tasks resampled)")
    return ["**Points outside their own 95% interval** (bootstrap skew; the point is the mean "
            "over runs): " + (", ".join(found) if found else "none") + ".", ""]


def v4_lines(results):
    v4 = results["v4"]
    fam = v4["families"]["all"]
    lines = ["## Verdict (protocol v4)", "",
             f"Headline basis: {v4['headline_basis']} ({counted(len(fam['tasks']), 'task')}: "
             f"{', '.join(fam['tasks'])}). R_pair = mean over eval pairs of R on each pair's "
             "own map; intervals: hierarchical bootstrap (training seeds → nested split seeds "
             "→ eval pairs), and one that also resamples tasks. A reading reproduces the "
             "paper's pair against a form of patching only when R_pair ≥ 0.88, compute ≤ 0.05 "
             "against that form, and both paired differences' intervals lie above 0.", ""]
    lines += verdict_table(v4) + [""] + sentence(v4)
    for name in v4["families"]:
        if name != "all":
            lines += [f"### Family `{name}` (v4)", ""] + verdict_table(v4, name) + [""]
    return lines + task_table(results) + column_lines(results) + outside_lines(results)
