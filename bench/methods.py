"""The method family of docs/protocol.md v3: how each reading of "a steering vector as a
per-site attribution" turns cached activations (and a few steered forwards) into
scores a_s, per eval pair, over the sites (l, p).

Shapes: fit_dp (n_fit, L+1, D) = h(clean) - h(corrupt) at each D_fit pair's
contrast position p*; diffs / grads (n_eval, L+1, T, D) over every site;
per-pair scores (n_eval, L+1, T). Nothing here reads a patching result.
"""
import numpy as np
import torch

import steerops
from steerops.model.inputs import model_output
from steerops.model.vectors import optimize_vector
from steerops.sweeps.reuse import reuse_sweep

from . import faithfulness as F

ALPHA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # multiples of v_l (1 = the mean contrast)
CLASS_MIN_PAIRS = 8                           # S1-class: a class vector needs this many D_fit pairs
METHODS = ("S1-proj", "S1-proj-abs", "S1-lin", "S1-exact", "S1-exact-odd", "S1-class", "S2",
           "AtP", "norm", "random", "S1-proj-randvec", "S1-proj-abs-randvec", "S1-exact-randvec")
CHEAP = ("S1-proj", "S1-proj-abs", "S1-lin", "S1-class", "AtP", "norm", "S1-proj-randvec",
         "S1-proj-abs-randvec")


def contrast_mask(pairs):
    mask = torch.zeros_like(pairs.clean, dtype=torch.bool)
    mask[torch.arange(len(pairs)), pairs.contrast] = True
    return mask


def at_contrast(diffs, contrast):
    """(n, L+1, T, D) -> (n, L+1, D) at each pair's contrast position."""
    return diffs[torch.arange(diffs.shape[0]), :, contrast.to(diffs.device)]


def fit_vectors(fit_dp):
    """v_l = E_fit[dh at p*], (L+1, D)."""
    return fit_dp.mean(0)


def class_vectors(fit_dp, fit_answer, eval_answer, min_pairs=CLASS_MIN_PAIRS):
    """S1-class: per eval pair, the vector of its clean-answer class when that class
    has >= ``min_pairs`` D_fit pairs, else the pooled vector: (n_eval, L+1, D)."""
    pooled = fit_dp.mean(0)
    out = pooled.expand(len(eval_answer), -1, -1).clone()
    for c in torch.unique(eval_answer):
        members = fit_answer == c
        if int(members.sum()) >= min_pairs:
            out[eval_answer == c] = fit_dp[members].mean(0)
    return out


def random_vectors(vectors, generator):
    """Random unit directions scaled to ||v_l|| (the control for the learned direction)."""
    r = torch.randn(vectors.shape, generator=generator, dtype=vectors.dtype)
    return r / r.norm(dim=-1, keepdim=True) * vectors.norm(dim=-1, keepdim=True)


def _unit(v):
    norm = v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return v / norm, norm.squeeze(-1)


def projection(diffs, vectors):
    """S1-proj per pair: (dh_s . u_l) ||v_l||. ``vectors`` (L+1, D) or per pair (n, L+1, D)."""
    u, norm = _unit(vectors)
    if vectors.dim() == 2:
        return torch.einsum("nltd,ld->nlt", diffs, u) * norm[None, :, None]
    return torch.einsum("nltd,nld->nlt", diffs, u) * norm[:, :, None]


def projection_abs(diffs, vectors):
    """S1-proj-abs per pair: |dh_s . u_l| ||v_l|| (a magnitude per pair, so projections
    of opposite sign on different pairs do not cancel in the mean)."""
    return projection(diffs, vectors).abs()


def linearised(diffs, grads, vectors):
    """S1-lin per pair: (dh_s . u_l)(u_l . dm/dh_s) on the corrupt run."""
    u, _ = _unit(vectors)
    return torch.einsum("nltd,ld->nlt", diffs, u) * torch.einsum("nltd,ld->nlt", grads, u)


def atp(diffs, grads):
    return (diffs * grads).sum(-1)


def norm_scores(diffs):
    return diffs.norm(dim=-1)


# ----------------------------------------------------------------------------- steered forwards

def _metric(pairs, device, repeat=1):
    return steerops.logit_diff(pairs.answer.repeat_interleave(repeat).to(device),
                               pairs.wrong.repeat_interleave(repeat).to(device))


def _metric_of(model, ids, metric):
    with torch.no_grad():
        logits = model(ids).logits
    return metric(logits, torch.arange(ids.shape[0], device=ids.device)).double().cpu()


def base_metrics(model, pairs, device):
    """(m(clean), m(corrupt)) per pair."""
    metric = _metric(pairs, device)
    return (_metric_of(model, pairs.clean.to(device), metric),
            _metric_of(model, pairs.corrupt.to(device), metric))


def val_recovery_table(model, val, vectors, device, grid=ALPHA_GRID, base=None):
    """Steering recovery on D_val of adding alpha v_l at p*, for every layer l and alpha
    in ``grid``: (L+1, len(grid)); ratio of means. One whole forward per layer (rows =
    pairs x alphas, one strength per row): the plain reference that
    :func:`val_recovery_table_reuse` (what the benchmark runs) is tested against."""
    m_clean, m_corrupt = base if base is not None else base_metrics(model, val, device)
    n, G = len(val), len(grid)
    ids = val.corrupt.repeat_interleave(G, 0).to(device)
    mask = contrast_mask(val).repeat_interleave(G, 0).to(device)
    alpha = torch.tensor(grid, dtype=torch.float32).repeat(n).to(device)
    metric = _metric(val, device, G)
    table = np.zeros((vectors.shape[0], G))
    for layer in range(vectors.shape[0]):
        with steerops.Steering(model, layer, vectors[layer].to(device), alpha, positions=mask):
            m = _metric_of(model, ids, metric).view(n, G)
        for j in range(G):
            table[layer, j] = F.recovery(m[:, j], m_clean, m_corrupt)
    return table


def choose_alphas(table, grid=ALPHA_GRID):
    """alpha_l: the grid value whose D_val recovery at (l, p*) is closest to 1 (steering
    that restores the clean metric, neither short of it nor overshooting)."""
    miss = np.abs(np.nan_to_num(table, nan=np.inf) - 1.0)
    return [float(grid[j]) for j in miss.argmin(1)]


def choose_layer_alpha(table, grid=ALPHA_GRID):
    """S2's (l*, alpha*): the cell of the D_val table closest to recovery 1."""
    miss = np.abs(np.nan_to_num(table, nan=np.inf) - 1.0)
    l, j = np.unravel_index(int(miss.argmin()), miss.shape)
    return int(l), float(grid[j])


def steered_effects(model, pairs, vectors, alphas, sites, device, base=None, max_rows=4096):
    """S1-exact per pair, by plain steered forwards (the reference :func:`steered_sweeps`
    is tested against): m(corrupt; h_s += alpha_l v_l) - m(corrupt) at each site in
    ``sites`` (bool (L+1, T)), NaN elsewhere: (n, L+1, T). Rows = pairs x positions of
    a layer, one steered position per row, in chunks of at most ``max_rows``."""
    if base is not None:
        m_corrupt = base[1]
    else:  # the unsteered corrupt run, part of this method's own cost
        m_corrupt = _metric_of(model, pairs.corrupt.to(device), _metric(pairs, device))
    n, T = pairs.corrupt.shape
    out = torch.full((n, vectors.shape[0], T), float("nan"), dtype=torch.float64)
    for layer in range(vectors.shape[0]):
        positions = np.nonzero(sites[layer])[0]
        if positions.size == 0:
            continue
        P = positions.size
        rows_ids = pairs.corrupt.repeat_interleave(P, 0)
        mask = torch.zeros(n * P, T, dtype=torch.bool)
        mask[torch.arange(n * P), torch.as_tensor(positions).repeat(n)] = True
        metric_all = _metric(pairs, device, P)
        values = []
        for start in range(0, n * P, max_rows):
            stop = min(start + max_rows, n * P)
            index = torch.arange(start, stop, device=device)
            with steerops.Steering(model, layer, vectors[layer].to(device), alphas[layer],
                                   positions=mask[start:stop].to(device)), torch.no_grad():
                logits = model(rows_ids[start:stop].to(device)).logits
            values.append(metric_all(logits, index).double().cpu())
        m = torch.cat(values).view(n, P)
        out[:, layer, torch.as_tensor(positions)] = m - m_corrupt[:, None]
    return out


def optimise_s2(model, fit, layer, alpha, init, steps, device):
    """S2's vector: ``init`` optimised on D_fit's corrupt prompts at p* through the fused
    op's backward (gradient ascent of the logit difference)."""
    if steps <= 0:
        return init.clone(), []
    metric = steerops.logit_diff(fit.answer.to(device), fit.wrong.to(device))
    v, history = optimize_vector(
        model, fit.corrupt.to(device), layer, init.to(device), metric, alpha=alpha,
        steps=steps, lr=0.05, positions=contrast_mask(fit).to(device))
    return v.detach().cpu(), history


# ----------------------------------------------------------------------------- cheapest form
# v3: every steered forward runs in patching's cheapest form (steerops.sweeps.reuse 'full': the
# corrupt run's KV prefix reused, the blocks before the site skipped, the LM head at the
# answer only). Steering at a site is a patch whose source is h_s(corrupt) + alpha v_l.

REUSE_BATCH = 512  # rows per forward


def add_reports(total, report, pairs):
    """Accumulates a reuse sweep's work counts (its base run: ``pairs`` rows)."""
    for key in ("token_layers_run", "head_tokens", "forwards", "rows"):
        total[key] = total.get(key, 0) + report[key]
    total["base_rows"] = total.get("base_rows", 0) + pairs
    return total


def _reuse(model, target_ids, sources, layers, pos, metric, device):
    raw, base, report = reuse_sweep(
        model, sources, {"input_ids": target_ids.to(device)}, metric, list(layers),
        torch.as_tensor(pos, dtype=torch.long, device=device), mode="full",
        batch_size=REUSE_BATCH, model_output=model_output, progress=False)
    return raw.double().cpu(), base.double().cpu(), report


def _dtype(model):
    return next(model.parameters()).dtype


def steered_sweeps(model, pairs, corrupt_acts, variants, alphas, sites, device):
    """S1-exact in the cheapest form: for each variant (name -> (L+1, D) vectors: +v,
    -v, a random direction ...) m(corrupt; h_s += alpha_l w_l) - m(corrupt) per pair at
    every site of ``sites`` (bool (L+1, T)), NaN elsewhere: ({name: (n, L+1, T)},
    work counts). One sweep for all variants (one corrupt base run): each variant is
    another copy of the site columns."""
    L1, T = sites.shape
    n = len(pairs)
    layers = [l for l in range(L1) if sites[l].any()]
    cols = np.flatnonzero(sites.any(0))
    names = list(variants)
    out = {name: torch.full((n, L1, T), float("nan"), dtype=torch.float64) for name in names}
    if not layers:
        return out, {}
    sources = {l: torch.cat([corrupt_acts[:, l, cols] + alphas[l] * variants[name][l]
                             for name in names], 1).to(device, _dtype(model)) for l in layers}
    raw, m_corrupt, report = _reuse(model, pairs.corrupt, sources, layers,
                                    np.tile(cols, len(names)), _metric(pairs, device), device)
    P, c = cols.size, torch.as_tensor(cols)
    for k, name in enumerate(names):
        for li, l in enumerate(layers):
            out[name][:, l, c] = raw[:, li, k * P:(k + 1) * P] - m_corrupt[:, None]
        out[name][:, torch.as_tensor(~sites)] = float("nan")
    return out, add_reports({}, report, n)


def val_recovery_table_reuse(model, val, corrupt_acts, vectors, device, base, grid=ALPHA_GRID):
    """:func:`val_recovery_table` in the cheapest form: per group of D_val pairs sharing
    p*, one reuse sweep over every layer with the alpha grid as copies of column p*.
    Returns ((L+1, len(grid)) table, work counts)."""
    m_clean, m_corrupt = base
    n, G, L1 = len(val), len(grid), vectors.shape[0]
    m = torch.empty(n, L1, G, dtype=torch.float64)
    work = {}
    for c in torch.unique(val.contrast).tolist():
        rows = torch.nonzero(val.contrast == c).flatten()
        group = val.select(rows)
        sources = {l: torch.stack([corrupt_acts[rows, l, c] + a * vectors[l] for a in grid],
                                  1).to(device, _dtype(model)) for l in range(L1)}
        raw, _, report = _reuse(model, group.corrupt, sources, range(L1), [c] * G,
                                _metric(group, device), device)
        m[rows] = raw
        add_reports(work, report, len(rows))
    table = np.array([[F.recovery(m[:, l, j], m_clean, m_corrupt) for j in range(G)]
                      for l in range(L1)])
    return table, work
