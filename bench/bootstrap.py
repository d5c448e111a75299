"""docs/protocol.md v3's hierarchical bootstrap: resample training seeds, then split
seeds within each, then eval pairs within each run.

Each run carries ``n_boot`` within-run draws (its eval pairs resampled, its vectors
those fitted on its own D_fit: ``bench.evaluate.bootstrap``). A task's draw b picks
training seeds with replacement, for each picked seed its split seeds with
replacement, and for each picked run one of its within-run draws; the task's value
is the mean of the picked runs' values. Tasks are independent models, so each task
is resampled on its own; a headline's draw b is the mean over its tasks of their
draw b. The interval is the 2.5-97.5 percentile of the draws; the bias is the mean
of the draws minus the point estimate (the mean over the task's runs); a point that
lies outside its interval is flagged.
"""
from collections import defaultdict

import numpy as np


def task_draws(runs, keys, n_draws, seed):
    """{key: (n_draws,) array} of one task's hierarchical draws; ``runs`` each have
    ``train_seed`` and ``bootstrap`` ({key: [within-run draws]}, None = undefined).
    The same picks serve every key (paired draws: within-run draw j of a run is the
    same eval-pair resample for every key)."""
    rng = np.random.default_rng(seed)
    by_seed = defaultdict(list)
    for i, r in enumerate(runs):
        by_seed[r.get("train_seed", 0)].append(i)
    seeds = sorted(by_seed)
    width = max(len(v) for r in runs for v in r["bootstrap"].values())
    counts = np.array([max((len(v) for v in r["bootstrap"].values()), default=0)
                       for r in runs])
    table = {}
    for k in keys:
        m = np.full((len(runs), max(width, 1)), np.nan)
        for i, r in enumerate(runs):
            w = [np.nan if v is None else v for v in r["bootstrap"].get(k, [])]
            m[i, :len(w)] = w
        table[k] = m
    out = {k: np.full(n_draws, np.nan) for k in keys}
    for b in range(n_draws):
        picked = []
        for s in rng.choice(len(seeds), len(seeds)):
            members = by_seed[seeds[s]]
            picked += [members[j] for j in rng.choice(len(members), len(members))]
        rows = np.asarray(picked)
        cols = rng.integers(0, np.maximum(counts[rows], 1))
        for k in keys:
            values = table[k][rows, cols]
            values = values[np.isfinite(values)]
            if values.size:
                out[k][b] = values.mean()
    return out


def combine(task_draw_arrays):
    """A headline's draws: draw b = the mean over tasks of their draw b (NaN draws
    of a task are left out of that draw's mean)."""
    if not task_draw_arrays:
        return np.zeros(0)
    stacked = np.vstack(task_draw_arrays)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(stacked), stacked, np.nan), 0)


def interval(draws, point, level=0.95):
    """{ci95, bias, outside, draws}: the percentile interval, the bootstrap's bias and
    whether the point lies outside the interval."""
    d = np.asarray(draws, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0 or point is None or not np.isfinite(point):
        return {"ci95": [None, None], "bias": None, "outside": None, "draws": int(d.size)}
    lo, hi = np.percentile(d, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return {"ci95": [float(lo), float(hi)], "bias": float(d.mean() - point),
            "outside": bool(point < lo or point > hi), "draws": int(d.size)}
