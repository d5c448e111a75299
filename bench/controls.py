"""Protocol v4's controls (docs/protocol.md): what a reading must beat before its score
can be put down to the steering vector.

- **Random-direction twins**: every steering reading computed again with its learned
  direction u_l replaced by a random unit direction (scaled to ||v_l||, so the
  reading's own alpha applies unchanged); ``N_TWINS`` draws per run from a seed
  derived from the run itself (task, training seed, split seed), the mean reported.
- **Positional priors** (no model, no compute): ``prior-answer`` ranks the answer
  column first, later layers first; ``prior-path`` ranks the answer column, then the
  pair's p* column, then the rest, later layers first within each.
- **Per-pair faithfulness** R_pair: R on each eval pair's own map g^i with that pair's
  scores a^i, on that pair's S* (S* less the sites identical on that pair), averaged.
"""
import hashlib

import numpy as np
import torch

from . import faithfulness as F

N_TWINS = 5
# each steering reading and the name of its twin (the twin's R is the mean over draws)
TWINS = {m: m + "~twin" for m in ("S1-proj", "S1-proj-abs", "S1-lin", "S1-exact",
                                  "S1-exact-odd", "S2")}
PRIORS = ("prior-answer", "prior-path")


def derived_seed(*parts):
    """A 63-bit seed from the parts' text (a run's own stream: not shared across tasks)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_seed(task, train_seed, index):
    """The index-th split seed of one task model: nested in the training seed, so every
    model (task, training seed) draws its own pair pools."""
    return derived_seed("split", task, train_seed, index) % (1 << 31)


def twin_directions(vectors, seed, n=N_TWINS):
    """``n`` random directions, each (L+1, D) with row l of norm ||v_l||."""
    g = torch.Generator().manual_seed(int(seed))
    norms = vectors.norm(dim=-1, keepdim=True)
    out = []
    for _ in range(n):
        r = torch.randn(vectors.shape, generator=g, dtype=torch.float64).to(vectors.dtype)
        out.append(r / r.norm(dim=-1, keepdim=True) * norms)
    return out


def prior_answer(L1, T, answer=None):
    """(L+1, T): (p = answer) * 2 + l / (L + 1)."""
    answer = T - 1 if answer is None else answer
    layer = np.arange(L1)[:, None] / L1
    return np.broadcast_to((np.arange(T)[None] == answer) * 2.0 + layer, (L1, T)).copy()


def prior_path(L1, T, contrast, answer=None):
    """(n, L+1, T): answer column, then the pair's p* column, then the rest; later layers
    first within each."""
    answer = T - 1 if answer is None else answer
    contrast = np.asarray(contrast)
    pos = np.arange(T)[None, None, :]
    tier = (pos == answer) * 4.0 + (pos == contrast[:, None, None]) * 2.0
    return tier + (np.arange(L1)[None, :, None] / L1)


def pair_effects(raw, m_clean, m_corrupt):
    """g^i per pair: (m_i(patched) - m_i(corrupt)) / (m_i(clean) - m_i(corrupt)), (n, L+1, T)."""
    raw, mc, mx = (np.asarray(x, dtype=np.float64) for x in (raw, m_clean, m_corrupt))
    return (raw - mx[:, None, None]) / (mc - mx)[:, None, None]


def pair_star(diffs, star):
    """Per pair, S* less the sites identical on that pair: (n, L+1, T) bool."""
    differ = (np.asarray(diffs) != 0).any(-1)
    return differ & np.asarray(star)[None]


def pair_R(scores, g_pairs, stars):
    """R on each pair's own map: (n,) array, ranking by |a^i| on that pair's S*."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.full(len(g_pairs), np.nan)
    for i, (g, s) in enumerate(zip(g_pairs, stars)):
        if s.any():
            out[i] = F.R_all_k(np.abs(np.nan_to_num(scores[i][s])), g[s])
    return out


def mean_of(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def shares(g, star, answer=None, top=3):
    """Answer-column share and top-3 share of sum |g| over S*."""
    g = np.abs(np.asarray(g, dtype=np.float64))
    star = np.asarray(star, dtype=bool)
    answer = g.shape[1] - 1 if answer is None else answer
    total = g[star].sum()
    if total == 0:
        return {"answer_column_share": float("nan"), "top3_share": float("nan")}
    column = np.zeros_like(star)
    column[:, answer] = True
    return {"answer_column_share": float(g[star & column].sum() / total),
            "top3_share": float(np.sort(g[star])[::-1][:top].sum() / total)}
