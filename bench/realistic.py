"""Compute at sizes beyond the task models: the analytic S1-proj / patching ratio
over |S| and eval pairs, and realistic configs (GPT-2-small, a ~1B Llama) by
FLOPs (fake tensors: any supported transformers version) and measured time.
"""
import torch

import steerops

from .compute import Ledger, analytic_forward_flops, meta_forward_flops, patching_floor_flops


def compute_curves(config, T, n_fit, n_eval, max_sites):
    """Analytic compute ratio (S1 / patching) vs |S| and vs number of eval pairs."""
    cache = analytic_forward_flops(config, T, False)
    steer = (2 * n_fit + 2 * n_eval) * cache

    L1 = config.num_hidden_layers + 1
    base = 2 * analytic_forward_flops(config, T)
    per_site = (patching_floor_flops(config, T, 1) - base) / (L1 * T)  # mean, cheapest form

    def patch(sites, n):
        return n * (base + sites * per_site)

    sites = sorted({1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, max_sites})
    return {"max_sites": max_sites, "sites": sites,
            "ratio_vs_sites": [steer / patch(s, n_eval) for s in sites],
            "pairs": [8, 16, 32, 64, 128, 256],
            "ratio_vs_pairs": [(2 * n_fit + 2 * n) * cache / patch(max_sites, n)
                               for n in [8, 16, 32, 64, 128, 256]]}


def realistic(settings, device, T=10, progress=True):
    """The same protocol costs on randomly initialised models of realistic size:
    FLOPs on the meta device (GPT-2-small and a ~1B Llama-style config) and the
    measured time of both sides on GPT-2-small (random tokens, same |S| and pairs)."""
    import transformers as Tf
    configs = {
        "gpt2-small": Tf.GPT2Config(),
        "llama-1.1b": Tf.LlamaConfig(hidden_size=2048, intermediate_size=5632,
                                     num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, vocab_size=32000),
    }
    out = {}
    for name, cfg in configs.items():
        L1 = (getattr(cfg, "num_hidden_layers", None) or cfg.n_layer) + 1
        sites = L1 * T
        fwd = meta_forward_flops(lambda cfg=cfg: Tf.AutoModelForCausalLM.from_config(cfg), T)
        n_fit, n_eval = settings["n_fit"], settings["n_eval"]
        steer = (2 * n_fit + 2 * n_eval) * fwd
        plain = n_eval * (2 + sites) * fwd
        # the cheapest correct form (what patching_sweep runs), corrupted column 2 as timed
        patch = patching_floor_flops(cfg, T, n_eval, first_diff=2)
        out[name] = {"sites": sites, "tokens": T, "forward_flops_meta": fwd,
                     "patching_flops_plain": plain, "patching_flops_floor": patch,
                     "flops_ratio_S1_plain": steer / plain,
                     "analytic_forward_flops": analytic_forward_flops(cfg, T),
                     "flops_ratio_S1": steer / patch}
    # measured time of both sides, random tokens; D_fit as large as D_eval here
    pairs = {"gpt2-small": settings["realistic_pairs"],
             "llama-1.1b": settings.get("realistic_pairs_1b", 0)}
    for name, n in pairs.items():
        out[name]["measured"] = None
        if n <= 0:
            continue
        torch.manual_seed(0)
        model = Tf.AutoModelForCausalLM.from_config(configs[name]).to(device).eval()
        out[name]["measured"] = _time_both_sides(model, n, T, out[name]["sites"], device,
                                                 progress, settings["repeats"])
        del model
    return out


def _time_both_sides(model, n, T, sites, device, progress, repeats=1):
    V = model.config.vocab_size
    clean = torch.randint(0, V, (n, T), device=device)
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 1) % V
    metric = steerops.logit_diff(torch.zeros(n, dtype=torch.long),
                                 torch.ones(n, dtype=torch.long))
    ledger = Ledger(model.config)
    ledger.run("patching_sweep", lambda: steerops.patching_sweep(
        model, clean, corrupt, metric, progress=progress, reuse="full", distributed=False),
        sequences=2 * n + n * sites, tokens=T, side="patching", device=device, repeats=repeats)
    ledger.run("S1_caches", lambda: [steerops.cache_activations(model, x)
                                     for x in (clean, corrupt, clean, corrupt)],
               sequences=4 * n, tokens=T, lm_head=False, side="steering", device=device,
               repeats=repeats)
    s, p = ledger.totals("steering"), ledger.totals("patching")
    return {"pairs": n, "device": str(device), "repeats": repeats,
            "seconds_iqr": {st.name: [st.seconds_q1, st.seconds_q3] for st in ledger.stages},
            "steering_seconds": s["seconds"],
            "patching_seconds": p["seconds"], "time_ratio_S1": s["seconds"] / p["seconds"],
            "counted_flops_ratio_S1": s["counted_flops"] / p["counted_flops"]}


