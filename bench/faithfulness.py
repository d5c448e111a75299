"""Faithfulness measures of docs/protocol.md, on flat site arrays.

g: ground-truth patching effects per site; a: a method's scores per site.
Rankings are by signed value, highest first (a literal reading of top_k).
"""
import numpy as np

K_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.50)


def top_k_count(n_sites, fraction):
    return max(1, int(round(fraction * n_sites)))


def _top(x, k):
    # stable order so that ties are broken the same way every time
    return np.argsort(-np.asarray(x, dtype=np.float64), kind="stable")[:k]


def capture(a, g, fraction):
    """Cap(k) = sum of g over the method's top-k sites / sum of g over g's top-k sites."""
    g = np.asarray(g, dtype=np.float64).ravel()
    k = top_k_count(g.size, fraction)
    best = g[_top(g, k)].sum()
    return float(g[_top(np.asarray(a).ravel(), k)].sum() / best) if best != 0 else float("nan")


def capture_curve(a, g, fractions=K_FRACTIONS):
    return [capture(a, g, f) for f in fractions]


def expected_random_capture(g, fraction):
    """E[Cap(k)] of a uniformly random ranking: k * mean(g) / sum of g's top k."""
    g = np.asarray(g, dtype=np.float64).ravel()
    k = top_k_count(g.size, fraction)
    best = g[_top(g, k)].sum()
    return float(k * g.mean() / best) if best != 0 else float("nan")


def faithfulness_R(a, g, fractions=K_FRACTIONS):
    """R = mean of Cap(k) over the k fractions (patching itself scores 1)."""
    return float(np.mean(capture_curve(a, g, fractions)))


def random_R(g, fractions=K_FRACTIONS):
    return float(np.mean([expected_random_capture(g, f) for f in fractions]))


def chance_corrected(R, R_random):
    """R' = (R - R_random) / (1 - R_random)."""
    return float((R - R_random) / (1 - R_random)) if R_random != 1 else float("nan")


def _ranks(x):
    """Ranks 1..n with ties averaged."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(1, x.size + 1)
    for value in np.unique(x):
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a, g):
    ra, rg = _ranks(a), _ranks(g)
    ra, rg = ra - ra.mean(), rg - rg.mean()
    denom = np.sqrt((ra ** 2).sum() * (rg ** 2).sum())
    return float((ra * rg).sum() / denom) if denom > 0 else float("nan")


def top_recall(a, g, fraction=0.10):
    """Share of g's top-fraction sites that are in the method's top fraction."""
    k = top_k_count(np.asarray(g).size, fraction)
    return len(set(_top(a, k).tolist()) & set(_top(g, k).tolist())) / k


def recovery(m_intervened, m_clean, m_corrupt):
    """(E[m(intervened)] - E[m(corrupt)]) / (E[m(clean)] - E[m(corrupt)]) (ratio of means)."""
    mi, mc, mx = (float(np.mean(np.asarray(v, dtype=np.float64)))
                  for v in (m_intervened, m_clean, m_corrupt))
    return (mi - mx) / (mc - mx) if mc != mx else float("nan")


def summarize(a, g):
    R, Rr = faithfulness_R(a, g), random_R(g)
    return {"R": R, "R_prime": chance_corrected(R, Rr), "spearman": spearman(a, g),
            "top10_recall": top_recall(a, g), "cap": capture_curve(a, g)}


def bootstrap_interval(statistic, n_items, n_boot=200, seed=0, level=0.95):
    """Percentile interval of ``statistic(index)`` over resamples of the items."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        v = statistic(rng.integers(0, n_items, n_items))
        if np.isfinite(v):
            values.append(v)
    if not values:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------- version 2
# docs/protocol.md v2: scores on the informative sites S*, ranking by |a| (primary) or
# signed a, ties broken by expectation (the mean over every order of the tied sites).

def informative_sites(diffs, contrast, last_layer=None, last_position=None):
    """Boolean (L+1, T) mask of S* = S - S_0 - S_end.

    ``diffs``: (pairs, L+1, T, D) h(clean) - h(corrupt) over the eval pairs;
    ``contrast``: (pairs,) each pair's contrast position p*. S_0: sites where
    clean and corrupt are identical on every pair; S_end: (0, p*) and (L, last).
    """
    diffs = np.asarray(diffs)
    L1, T = diffs.shape[1], diffs.shape[2]
    informative = np.any(diffs != 0, axis=(0, 3))
    informative[0, np.unique(np.asarray(contrast))] = False
    informative[L1 - 1 if last_layer is None else last_layer,
                T - 1 if last_position is None else last_position] = False
    return informative


def expected_top_sum(a, g, k):
    """E[sum of g over the k highest a], ties in a broken uniformly at random."""
    a, g = np.asarray(a, dtype=np.float64).ravel(), np.asarray(g, dtype=np.float64).ravel()
    threshold = np.sort(a)[::-1][k - 1]
    above = a > threshold
    tied = a == threshold
    return float(g[above].sum() + (k - above.sum()) * g[tied].mean())


def capture_v2(a, g, fraction):
    """Cap(k) with ties by expectation; NaN when g's own top-k sums to 0."""
    g = np.asarray(g, dtype=np.float64).ravel()
    k = top_k_count(g.size, fraction)
    best = np.sort(g)[::-1][:k].sum()
    return expected_top_sum(a, g, k) / best if best != 0 else float("nan")


def expected_top_recall(a, g, fraction=0.10):
    """E[share of g's top-fraction sites among a's top fraction], ties by expectation."""
    a, g = np.asarray(a, dtype=np.float64).ravel(), np.asarray(g, dtype=np.float64).ravel()
    k = top_k_count(g.size, fraction)
    member = np.zeros(g.size)
    member[np.argsort(-g, kind="stable")[:k]] = 1.0
    return expected_top_sum(a, member, k) / k


def measures(a, g, *, signed=False, R_norm=None):
    """R, R', R'' (when the norm baseline's R is given), Spearman, top-10% recall and
    the Cap(k) curve of scores ``a`` against effects ``g`` on the same sites."""
    a, g = np.asarray(a, dtype=np.float64).ravel(), np.asarray(g, dtype=np.float64).ravel()
    ranked = a if signed else np.abs(a)
    cap = [capture_v2(ranked, g, f) for f in K_FRACTIONS]
    R = float(np.mean(cap))
    R_rand = random_R(g)
    out = {"R": R, "R_prime": chance_corrected(R, R_rand), "spearman": spearman(ranked, g),
           "top10_recall": expected_top_recall(ranked, g), "cap": cap}
    if R_norm is not None:
        out["R_skill"] = skill(R, R_norm)
    return out


def skill(R, R_norm):
    """R'' = (R - R_norm) / (1 - R_norm): skill over ranking sites by ||dh|| (< 0: worse);
    undefined (NaN) where the norm baseline leaves under 1% to gain (R_norm > 0.99)."""
    if R_norm is None or not np.isfinite(R_norm) or R_norm > 0.99:
        return float("nan")
    return float((R - R_norm) / (1 - R_norm))


def guarded_recovery(steering_effects, g, min_sum=0.1):
    """Ratio of sums over a site set: sum of steering recoveries / sum of g, or None
    ("undefined") when sum of g < ``min_sum`` (never a 0/0 or a huge ratio)."""
    total = float(np.sum(g))
    if not np.isfinite(total) or total < min_sum:
        return None
    return float(np.sum(steering_effects) / total)


def percentile_interval(values, level=0.95):
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)])
    if values.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------- version 3
# docs/protocol.md v3: S* also leaves out the sites that cannot reach the metric (S_dead),
# and R is the mean of Cap(k) over every k = 1 .. ceil(|S*| / 2) (no grid, no rounding).

def dead_sites(L1, T, metric_positions=None):
    """Boolean (L+1, T) mask of S_dead: (L, p) for every p other than the metric's
    positions, and (l, p) for every p after the last metric position (default: the
    metric reads the last position only)."""
    metric_positions = [T - 1] if metric_positions is None else list(metric_positions)
    dead = np.zeros((L1, T), bool)
    dead[L1 - 1] = True
    dead[L1 - 1, metric_positions] = False
    dead[:, max(metric_positions) + 1:] = True
    return dead


def star_sites(diffs, contrast, metric_positions=None):
    """Boolean (L+1, T) mask of v3's S* = S - S_0 - S_end - S_dead."""
    star = informative_sites(diffs, contrast)
    return star & ~dead_sites(star.shape[0], star.shape[1], metric_positions)


def k_max(n_sites):
    """The largest k of R: ceil(|S*| / 2)."""
    return (int(n_sites) + 1) // 2


def expected_top_sums(a, g, k_last):
    """E[sum of g over the k highest a] for every k = 1..k_last, ties in a broken
    uniformly at random (each tied site equally likely to be taken): (k_last,)."""
    a, g = np.asarray(a, dtype=np.float64).ravel(), np.asarray(g, dtype=np.float64).ravel()
    order = np.argsort(-a, kind="stable")
    a_s, g_s = a[order], g[order]
    starts = np.flatnonzero(np.r_[True, a_s[1:] != a_s[:-1]])
    sums = np.add.reduceat(g_s, starts)
    sizes = np.diff(np.r_[starts, a_s.size])
    before = np.r_[0.0, np.cumsum(sums)[:-1]]
    k = np.arange(1, k_last + 1)
    group = np.searchsorted(starts, k - 1, side="right") - 1
    return before[group] + (k - starts[group]) * sums[group] / sizes[group]


def capture_all_k(a, g, k_last=None):
    """Cap(k) for k = 1..k_last (default ceil(n/2)), ties by expectation; NaN where g's
    own top-k sums to 0."""
    g = np.asarray(g, dtype=np.float64).ravel()
    k_last = k_max(g.size) if k_last is None else k_last
    if k_last < 1:
        return np.zeros(0)
    best = np.cumsum(np.sort(g)[::-1][:k_last])
    got = expected_top_sums(a, g, k_last)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(best != 0, got / np.where(best != 0, best, 1), np.nan)


def random_capture_all_k(g, k_last=None):
    """E[Cap(k)] of a uniformly random ranking for every k: k mean(g) / top-k sum."""
    g = np.asarray(g, dtype=np.float64).ravel()
    return capture_all_k(np.zeros_like(g), g, k_last)


def R_all_k(a, g):
    """v3's R: the mean of Cap(k) over every k = 1..ceil(|S*|/2) (NaN k's skipped)."""
    cap = capture_all_k(a, g)
    return float(np.nanmean(cap)) if np.isfinite(cap).any() else float("nan")


def measures_v3(a, g, *, signed=False, R_norm=None):
    """v3's measures of scores ``a`` against effects ``g`` on the same sites (S*): R over
    every k, v2's grid R beside it (``R_grid``), R' (over random), R'' (over the norm
    baseline, when its R is given), Spearman, top-10% recall, Cap at every k and at the
    v2 grid."""
    a, g = np.asarray(a, dtype=np.float64).ravel(), np.asarray(g, dtype=np.float64).ravel()
    ranked = a if signed else np.abs(a)
    cap = capture_all_k(ranked, g)
    R = float(np.nanmean(cap)) if np.isfinite(cap).any() else float("nan")
    R_rand = float(np.nanmean(random_capture_all_k(g))) if g.size else float("nan")
    grid = [capture_v2(ranked, g, f) for f in K_FRACTIONS]
    out = {"R": R, "R_grid": float(np.mean(grid)), "R_prime": chance_corrected(R, R_rand),
           "spearman": spearman(ranked, g), "top10_recall": expected_top_recall(ranked, g),
           "cap": cap.tolist(), "cap_grid": grid}
    if R_norm is not None:
        out["R_skill"] = skill(R, R_norm)
    return out


def random_measures_v3(g, R_norm=None):
    """The random ranking's measures in exact expectation (the same keys)."""
    g = np.asarray(g, dtype=np.float64).ravel()
    cap = random_capture_all_k(g)
    R = float(np.nanmean(cap)) if np.isfinite(cap).any() else float("nan")
    out = {"R": R, "R_grid": random_R(g), "R_prime": 0.0, "spearman": float("nan"),
           "top10_recall": top_k_count(g.size, 0.1) / g.size if g.size else float("nan"),
           "cap": cap.tolist(), "cap_grid": [expected_random_capture(g, f) for f in K_FRACTIONS]}
    if R_norm is not None:
        out["R_skill"] = skill(R, R_norm)
    return out
