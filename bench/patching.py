"""Patching-sweep benchmark: the reuse form against the plain batched sweep and
two hand-written hook loops, side by side in one process.

    steerops bench patching                # GPT-2-small at T = 12 and 32, a Llama-style config
    steerops bench patching --quick        # T = 12 only, one repeat

Forms (denoising, every residual site (l, p), logit difference at the last
position):
- ``reuse``: ``steerops.patching_sweep`` (default reuse='full'; see steerops.reuse);
- ``plain``: ``steerops.patching_sweep(reuse='none')``, batched (pair, site) rows;
- ``hook_one_site``: a hand-written loop, one forward per (pair, site), a forward
  hook that overwrites the site;
- ``hook_batched_layer``: a hand-written loop, one forward per (pair, layer)
  with every position of that layer patched in its own batch row.

Reported per config: median seconds over repeats with the interquartile range,
sites per second, the ratio of each form to reuse, FLOPs actually run
(FlopCounterMode, one run of each sweep form) against the analytic floor
(sum over sites of (L - l)(T - p) token-layers plus the head at the answer), and
peak memory (CUDA allocator peak; on CPU the sweep's own estimate, labelled so).
Torch's thread count is set explicitly and recorded.
"""
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import steerops
from steerops.cli_args import Parser, device, output_folder, positive_int
from steerops.models import find_layers

from .compute import analytic_forward_flops, patching_floor_flops, reuse_sweep_flops
from .provenance import environment, save_results

CONFIGS = {
    "gpt2-small T=12": ("gpt2", 12),
    "gpt2-small T=32": ("gpt2", 32),
    "llama-style T=32": ("llama", 32),
}


def build_model(kind, device):
    import transformers as Tf
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = Tf.GPT2Config()
    else:  # a Llama-style model of GPT-2-small's size
        cfg = Tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=4, vocab_size=32000)
    return Tf.AutoModelForCausalLM.from_config(cfg).to(device).eval()


def make_pairs(model, pairs, T, device, corrupt_at=2):
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    clean = torch.randint(0, V, (pairs, T), generator=g).to(device)
    corrupt = clean.clone()
    corrupt[:, corrupt_at] = (corrupt[:, corrupt_at] + 1) % V
    metric = steerops.logit_diff(torch.arange(pairs) % V, (torch.arange(pairs) + 7) % V)
    return clean, corrupt, metric


def _site_hook(block, layer, fn):
    """A hand-written hook: layer 0 = the first block's input, l = block l's output."""
    if layer == 0:
        return block.register_forward_pre_hook(
            lambda m, args, kwargs: ((fn(args[0]),) + args[1:], kwargs) if args
            else (args, dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))),
            with_kwargs=True)
    return block.register_forward_hook(
        lambda m, a, out: (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out))


def _loop_setup(model, clean):
    """What both hand-written loops start from: blocks, the clean activations of
    every site, and the raw-value table (pairs, L + 1, T)."""
    blocks = find_layers(model)
    pairs, T = clean.shape
    return blocks, steerops.cache_activations(model, clean), torch.empty(pairs, len(blocks) + 1, T)


def _hooked_logits(model, blocks, layer, fn, inputs):
    """Logits of one forward with ``fn`` hooked on site ``layer``."""
    handle = _site_hook(blocks[max(layer - 1, 0)], layer, fn)
    try:
        return model(inputs).logits
    finally:
        handle.remove()


def hook_one_site(model, clean, corrupt, metric):
    """One forward per (pair, site)."""
    blocks, cache, raw = _loop_setup(model, clean)
    L, (pairs, T) = len(blocks), clean.shape
    with torch.no_grad():
        for i in range(pairs):
            for layer in range(L + 1):
                for p in range(T):
                    def put(h, i=i, layer=layer, p=p):
                        h = h.clone()
                        h[:, p] = cache[layer][i, p]
                        return h
                    logits = _hooked_logits(model, blocks, layer, put, corrupt[i:i + 1])
                    raw[i, layer, p] = metric(logits, torch.tensor([i]))[0]
    return raw


def hook_batched_layer(model, clean, corrupt, metric):
    """One forward per (pair, layer): row p of the batch patches position p."""
    blocks, cache, raw = _loop_setup(model, clean)
    L, (pairs, T) = len(blocks), clean.shape
    cols = torch.arange(T, device=clean.device)
    with torch.no_grad():
        for i in range(pairs):
            for layer in range(L + 1):
                def put(h, i=i, layer=layer):
                    h = h.clone()
                    h[cols, cols] = cache[layer][i]
                    return h
                logits = _hooked_logits(model, blocks, layer, put, corrupt[i:i + 1].expand(T, T))
                raw[i, layer] = metric(logits, torch.full((T,), i))
    return raw


def _timed(fn, repeats, device):
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return result, {"median_s": statistics.median(times), "iqr_s": [q[0], q[2]],
                    "runs": times}


def dry_run(name, kind, T, pairs, device, memory_budget_mb=1024):
    """The plans of a config's sweep in the reuse and plain forms, with estimated times
    from a short calibration: what `run_config` would cost, without running it."""
    model = build_model(kind, device)
    clean, corrupt, metric = make_pairs(model, pairs, T, device)
    for reuse in ("auto", "none"):
        print(f"\n{name}, reuse={reuse!r}:")
        plan = steerops.plan_sweep(model, clean, corrupt, metric, reuse=reuse,
                                   memory_budget_mb=memory_budget_mb)
        plan.calibrate()
        plan.describe()


def run_config(name, kind, T, pairs, repeats, device, memory_budget_mb=1024):
    model = build_model(kind, device)
    cfg = model.config
    L = len(find_layers(model))
    sites = (L + 1) * T
    clean, corrupt, metric = make_pairs(model, pairs, T, device)
    sweep = dict(progress=False, memory_budget_mb=memory_budget_mb)
    forms = {
        "reuse": lambda: steerops.patching_sweep(model, clean, corrupt, metric, **sweep),
        "plain": lambda: steerops.patching_sweep(model, clean, corrupt, metric, reuse="none",
                                                 **sweep),
        "hook_one_site": lambda: hook_one_site(model, clean, corrupt, metric),
        "hook_batched_layer": lambda: hook_batched_layer(model, clean, corrupt, metric),
    }
    out = {"config": name, "model": kind, "tokens": T, "pairs": pairs, "layers": L,
           "sites": sites, "forms": {}}
    raws = {}
    for form, fn in forms.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result, timing = _timed(fn, repeats, device)
        raws[form] = result.raw.cpu() if hasattr(result, "raw") else result.cpu()
        entry = dict(timing, sites_per_s=pairs * sites / timing["median_s"])
        if device.type == "cuda":
            entry["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if hasattr(result, "extra"):
            entry["reuse_report"] = result.extra["reuse"]
            with FlopCounterMode(display=False) as counter:
                fn()
            entry["flops_run"] = int(counter.get_total_flops())
        out["forms"][form] = entry
    reuse = out["forms"]["reuse"]
    for form, entry in out["forms"].items():
        entry["reuse_speedup"] = entry["median_s"] / reuse["median_s"]
        # every form computes the same effects (fp32; batch composition moves the last bits)
        entry["max_abs_diff_vs_plain"] = float((raws[form] - raws["plain"]).abs().max())
    out["flops_floor"] = patching_floor_flops(cfg, T, pairs, first_diff=2)
    out["flops_plain_analytic"] = pairs * (2 + sites) * analytic_forward_flops(cfg, T)
    out["flops_reuse_analytic"] = reuse_sweep_flops(cfg, reuse["reuse_report"], pairs, T)
    out["flops_run_over_floor"] = reuse["flops_run"] / out["flops_floor"]
    if device.type != "cuda":
        elem = next(model.parameters()).element_size()
        D = getattr(cfg, "hidden_size", None) or cfg.n_embd
        # what reuse holds beyond a plain forward: every layer's hidden states and the KV
        # cache of the base run (the sweep's batches stay within memory_budget_mb)
        held = pairs * T * D * elem * ((L + 1) + 2 * L)
        out["memory_note"] = (f"CPU: no allocator peak; reuse holds {held / 2**20:.1f} MB of "
                              f"base-run state; batches bounded by memory_budget_mb="
                              f"{memory_budget_mb}")
    del model
    return out


def markdown(result):
    lines = [f"Patching sweep forms side by side ({result['environment']['device']}, torch "
             f"threads {result['threads']}, torch {result['environment']['torch']}, "
             f"transformers {result['environment']['transformers']}, commit "
             f"{result['environment']['commit']}); median of {result['repeats']} runs "
             f"[interquartile range].", "",
             "| config | pairs x sites | form | seconds [IQR] | sites/s | slower than reuse | "
             "FLOPs run / floor | max diff vs plain |", "|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        for form, e in c["forms"].items():
            ratio = (f"{e['flops_run'] / c['flops_floor']:.2f}" if "flops_run" in e
                     else f"{c['flops_plain_analytic'] / c['flops_floor']:.2f} (analytic)")
            lines.append(f"| {c['config']} | {c['pairs']} x {c['sites']} | {form} | "
                         f"{e['median_s']:.2f} [{e['iqr_s'][0]:.2f}, {e['iqr_s'][1]:.2f}] | "
                         f"{e['sites_per_s']:.1f} | {e['reuse_speedup']:.2f}x | {ratio} | "
                         f"{e['max_abs_diff_vs_plain']:.1e} |")
    return "\n".join(lines)


def build_parser():
    p = Parser(
        prog="steerops bench patching",
        description="Patching sweep forms side by side: reuse vs plain vs hand-written hook "
                    "loops; sites/s, FLOPs run vs the floor, memory.")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   metavar="CONFIG", help=f"configs (default: all): {'; '.join(CONFIGS)}")
    p.add_argument("--quick", action="store_true",
                   help="GPT-2-small at T = 12 only, one repeat")
    p.add_argument("--pairs", type=positive_int, default=2, help="prompt pairs (default: 2)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per form (default: 3)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads, set explicitly and recorded (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   type=device, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each config's sweep plan (sites, forwards, FLOPs, memory, a "
                        "calibrated time estimate) for the reuse and plain forms, run nothing")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "patching"),
                   type=output_folder, help="output folder (default: bench/results/patching)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = ["gpt2-small T=12"] if args.quick else args.configs
    repeats = 1 if args.quick else args.repeats
    device = torch.device(args.device)
    if args.dry_run:
        for name in configs:
            dry_run(name, *CONFIGS[name], args.pairs, device)
        return 0
    result = {"environment": environment(), "threads": torch.get_num_threads(),
              "repeats": repeats, "configs": []}
    for name in configs:
        kind, T = CONFIGS[name]
        print(f"{name} ...", file=sys.stderr, flush=True)
        result["configs"].append(run_config(name, kind, T, args.pairs, repeats, device))
        save_results(args.out, "patching", result, markdown(result))  # after each config
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
