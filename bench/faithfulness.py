"""Faithfulness measures of PROTOCOL.md, on flat site arrays.

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
