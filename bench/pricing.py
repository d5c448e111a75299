"""docs/protocol.md v3's pricing rules, one set for both sides and every scale.

- A forward that needs the metric runs the LM head at the answer position only
  (``metric_forward``); a cache needs no head (``cache_forward``); a backward to the
  activations costs about one forward (``grad_forward``).
- Every intervened forward (a patched site, a steered site, each alpha of the grid)
  is priced in the cheapest correct form: blocks l+1..L over positions p..T-1, the
  rest from the base run's KV cache, the head at the answer (``site_flops``).
- Patching: naive-batched (one whole forward per site of S), prefix-reuse and the
  floor (only the sites that differ, per pair, and are not known by construction).
- The vector-fitting stages are counted, and also reported amortised (left out:
  the vector is fitted once and reused).

The same functions price a benchmark run (``bench.evaluate``) and the realistic
configs (``bench.realistic``), so a ratio means the same thing at every scale.
"""
from steerops.sweeps.flops import _dims, analytic_forward_flops, token_layer_flops

from .controls import N_TWINS

# the stages that fit a vector (amortised: fitted once, reused on new prompts)
FITTING = ("fit_caches", "val_table", "s2_optimise")

# which stages each method needs (its cost is their sum; shared stages count for each)
METHOD_STAGES = {
    "S1-proj": ("fit_caches", "eval_clean_cache", "eval_corrupt_cache"),
    "S1-proj-abs": ("fit_caches", "eval_clean_cache", "eval_corrupt_cache"),
    "S1-class": ("fit_caches", "eval_clean_cache", "eval_corrupt_cache"),
    "S1-lin": ("fit_caches", "eval_clean_cache", "eval_grads"),
    "S1-exact": ("fit_caches", "val_table", "eval_corrupt_cache", "exact_sweep"),
    "S1-exact-odd": ("fit_caches", "val_table", "eval_corrupt_cache", "exact_sweep",
                     "exact_sweep_negative"),
    "S2": ("fit_caches", "val_table", "s2_optimise", "eval_clean_cache", "eval_corrupt_cache"),
    "AtP": ("eval_clean_cache", "eval_grads"),
    "norm": ("eval_clean_cache", "eval_corrupt_cache"),
    "random": (),
}
# a random twin is priced as its reading (docs/protocol.md v4: one draw costs what the
# reading costs; the fit is paid for ||v_l|| and alpha_l)
for _m in ("S1-proj", "S1-proj-abs", "S1-exact"):
    METHOD_STAGES[_m + "-randvec"] = METHOD_STAGES[_m]


def head_flops(config):
    d, _, V = _dims(config)
    return 2 * d * V


def cache_forward(config, T):
    return analytic_forward_flops(config, T, lm_head=False)


def metric_forward(config, T):
    return cache_forward(config, T) + head_flops(config)


def grad_forward(config, T):
    return 2 * metric_forward(config, T)


def site_flops(config, T, layer, position):
    """One intervened forward at (layer, position) in the cheapest form."""
    _, L, _ = _dims(config)
    return (L - layer) * (T - position) * token_layer_flops(config, T) + head_flops(config)


def sites_flops(config, T, sites):
    return sum(site_flops(config, T, l, p) for l, p in sites)


def patching_forms(config, T, differing, all_sites):
    """FLOPs of patching's three forms for pairs whose differing sites are
    ``differing`` (a list per pair of (l, p)): naive-batched runs every site of
    ``all_sites`` (|S|) as a whole forward; prefix-reuse and the floor run only the
    differing sites (prefix-reuse through every block from p on). Each pair adds its
    two base runs."""
    _, L, _ = _dims(config)
    per = token_layer_flops(config, T)
    base = 2 * metric_forward(config, T)
    n = len(differing)
    return {
        "naive_batched": n * (base + all_sites * metric_forward(config, T)),
        "prefix_reuse": n * base + sum(L * (T - p) * per + head_flops(config)
                                       for sites in differing for _, p in sites),
        "floor": n * base + sum(sites_flops(config, T, sites) for sites in differing),
    }


def run_stages(config, T, *, n_fit, n_val, n_eval, val_contrast, star_sites, grid,
               s2_steps, s2_layer):
    """Every method stage's FLOPs under the rules above: {stage: FLOPs}.
    ``val_contrast``: p* of each D_val pair; ``star_sites``: the scored sites (l, p)."""
    _, L, _ = _dims(config)
    fwd = metric_forward(config, T)
    L1 = L + 1
    val_sites = sum(len(grid) * site_flops(config, T, l, p)
                    for p in val_contrast for l in range(L1))
    steered = n_eval * sites_flops(config, T, star_sites)
    above = (L - s2_layer) / L
    return {
        "fit_caches": 2 * n_fit * cache_forward(config, T),
        "eval_clean_cache": n_eval * cache_forward(config, T),
        # the corrupt cache is also the steered sweeps' base run: it carries the head
        "eval_corrupt_cache": n_eval * fwd,
        "eval_grads": n_eval * grad_forward(config, T),
        # clean and corrupt D_val metrics (the recovery's denominator), then the grid
        "val_table": 2 * n_val * fwd + val_sites,
        "exact_sweep": steered,
        "exact_sweep_negative": steered,
        # the random twins (bench.controls): +r and -r for each draw; controls, never
        # counted into a reading's cost
        "exact_sweep_randvec": N_TWINS * steered,
        "exact_sweep_randvec_negative": N_TWINS * steered,
        # per step and pair: one forward with head, the backward through the blocks above
        "s2_optimise": s2_steps * n_fit * fwd * (1 + above),
    }


def method_costs(stage_flops, patching, methods=METHOD_STAGES):
    """Per method: FLOPs counted and amortised (fitting left out), and each over every
    form of patching ({form: FLOPs})."""
    out = {}
    for m, stages in methods.items():
        counted = sum(stage_flops[s] for s in stages)
        amortised = sum(stage_flops[s] for s in stages if s not in FITTING)
        out[m] = {"flops": counted, "flops_amortised": amortised,
                  "ratio": {f: counted / v for f, v in patching.items()},
                  "ratio_amortised": {f: amortised / v for f, v in patching.items()}}
    return out
