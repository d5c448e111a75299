"""Attention-head patching timed: steerops' sweeps of ``sites="head_out"`` against a
one-site-per-forward hook loop (what TransformerLens'
``get_act_patch_attn_head_out_by_pos`` / ``..._all_pos`` do: one patched forward per
(block, head, position) or per (block, head)), side by side, interleaved rounds.

    steerops bench patching --sites head_out     # GPT-2-small, T = 8 and 16

Forms, each by position and at every position at once (``_all``):
- ``reuse``: ``patching_sweep(sites="head_out", reuse="full")``;
- ``plain``: ``patching_sweep(sites="head_out", reuse="none")``;
- ``hook_loop``: a hand-written loop, one forward per (pair, block, head[, position]),
  a pre-hook on the attention output projection that overwrites the head's slice.
"""
import statistics

import torch

import steerops
from steerops.model.blocks import find_layers

from .sweep_timing import interleaved, round_ratios


def _out_proj(block):
    return block.attn.c_proj  # GPT-2 (the benchmark's model)


def hook_loop(model, clean, corrupt, metric, per_position=True):
    """One forward per (pair, block, head[, position]): effects' raw table
    (pairs, L, H, T) or (pairs, L, H)."""
    blocks = find_layers(model)
    L, H = len(blocks), model.config.n_head
    pairs, T = clean.shape
    cache = steerops.cache_activations(model, clean, sites="head_out")
    d = cache.acts.shape[-1] // H
    raw = torch.empty(pairs, L, H, T) if per_position else torch.empty(pairs, L, H)
    with torch.no_grad():
        for i in range(pairs):
            for b in range(L):
                for h in range(H):
                    for p in (range(T) if per_position else [None]):
                        cols = slice(h * d, (h + 1) * d)
                        rows = slice(None) if p is None else slice(p, p + 1)

                        def put(module, args, i=i, b=b, rows=rows, cols=cols):
                            x = args[0].clone()
                            x[:, rows, cols] = cache[b][i, rows, cols]
                            return (x,) + tuple(args[1:])
                        handle = _out_proj(blocks[b]).register_forward_pre_hook(put)
                        try:
                            logits = model(corrupt[i:i + 1]).logits
                        finally:
                            handle.remove()
                        value = metric(logits, torch.tensor([i]))[0]
                        if per_position:
                            raw[i, b, h, p] = value
                        else:
                            raw[i, b, h] = value
    return raw


def run_head_config(name, model, clean, corrupt, metric, repeats, device):
    """The six forms of one config, interleaved; effects compared with the loop's."""
    pairs, T = clean.shape
    kind = model.config.model_type
    L, H = len(find_layers(model)), model.config.n_head

    def sweep(reuse, per_position):
        return lambda: steerops.patching_sweep(model, clean, corrupt, metric, sites="head_out",
                                               reuse=reuse, per_position=per_position,
                                               progress=False)
    forms = {"reuse": sweep("full", True), "plain": sweep("none", True),
             "hook_loop": lambda: hook_loop(model, clean, corrupt, metric, True),
             "reuse_all": sweep("full", False), "plain_all": sweep("none", False),
             "hook_loop_all": lambda: hook_loop(model, clean, corrupt, metric, False)}
    times, results = interleaved(forms, repeats, device)
    raws = {f: (r.raw if hasattr(r, "raw") else r).float().cpu() for f, r in results.items()}
    out = {"config": name, "model": kind, "tokens": T, "pairs": pairs, "layers": L,
           "heads": H, "forms": {}}
    for form, runs in times.items():
        loop = "hook_loop_all" if form.endswith("_all") else "hook_loop"
        per_pair = L * H * (1 if form.endswith("_all") else T)
        entry = out["forms"][form] = {
            "median_s": statistics.median(runs), "runs": runs,
            "patched_sites": pairs * per_pair,
            "sites_per_s": pairs * per_pair / statistics.median(runs),
            "loop_over_this": round_ratios(times, loop, form),
            "max_abs_diff_vs_loop": float((raws[form] - raws[loop]).abs().max())}
        if hasattr(results[form], "extra"):
            entry["plan_form"] = results[form].extra["plan"]["form"]
            entry["forwards"] = results[form].forwards
    return out


def head_markdown(result):
    lines = [f"Attention-head patching (sites='head_out') against a one-site-per-forward hook "
             f"loop ({result['environment']['device']}, torch threads {result['threads']}, torch "
             f"{result['environment']['torch']}, transformers "
             f"{result['environment']['transformers']}, commit "
             f"{result['environment']['commit']}); {result['repeats']} interleaved rounds "
             f"(every form once per round, order rotated). 'loop / this' is the median of the "
             f"per-round ratios [min, max].", "",
             "| config | form | patched sites | seconds (median) | sites/s | loop / this "
             "[range] | max diff vs loop |", "|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        for form, e in c["forms"].items():
            r = e["loop_over_this"]
            lines.append(f"| {c['config']} | {form} | {e['patched_sites']} | "
                         f"{e['median_s']:.2f} | {e['sites_per_s']:.1f} | {r['median']:.1f}x "
                         f"[{r['min']:.1f}, {r['max']:.1f}] | {e['max_abs_diff_vs_loop']:.1e} |")
    return "\n".join(lines)
