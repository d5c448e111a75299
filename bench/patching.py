"""Patching-sweep benchmark: the sweep's forms against two hand-written hook loops,
side by side in one process, in interleaved rounds.

    steerops bench patching                # GPT-2-small at T = 4, 8, 12, 32; Llama-style T=32
    steerops bench patching --quick        # T = 12 only, one round
    steerops bench patching --sites head_out   # attention heads at GPT-2-small, T = 8 and 16

Forms (denoising, every residual site (l, p), logit difference at the last
position):
- ``auto``: ``steerops.patching_sweep`` as called by default (reuse='auto': the cost
  model of steerops.sweeps.costs picks full or none; the table says which);
- ``reuse``: ``patching_sweep(reuse='full')`` (see steerops.sweeps.reuse);
- ``plain``: ``patching_sweep(reuse='none')``, batched (pair, site) rows;
- ``hook_one_site``: a hand-written loop, one forward per (pair, site), a forward
  hook that overwrites the site;
- ``hook_batched_layer``: a hand-written loop, one forward per (pair, layer)
  with every position of that layer patched in its own batch row.

Timing: ``--repeats`` rounds; each round runs every form once, the order rotated
from round to round, so a change of load lands on every form alike. Reported per
form: median seconds, sites per second, the median of the per-round ratios to
reuse with their range, FLOPs actually run (FlopCounterMode) against the analytic
floor (sum over sites of (L - l)(T - p) token-layers plus the head at the answer),
and peak memory (CUDA allocator peak; on CPU the resident peak above the baseline,
bench/memory.py). The limit: the floor's FLOPs at this machine's matmul rate on the
model's block matmuls, measured in the same run, against the sweep's time. Torch's
thread count is set explicitly and recorded.
"""
import os
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import steerops
from steerops.app.cli_args import Parser, device, output_folder, positive_int
from steerops.sweeps.costs import timed
from steerops.model.blocks import find_layers

from steerops.sweeps.flops import analytic_forward_flops, patching_floor_flops, reuse_sweep_flops
from .provenance import environment, save_results
from .sweep_timing import interleaved, round_ratios

CONFIGS = {
    "gpt2-small T=4": ("gpt2", 4),
    "gpt2-small T=8": ("gpt2", 8),
    "gpt2-small T=12": ("gpt2", 12),
    "gpt2-small T=32": ("gpt2", 32),
    "llama-style T=32": ("llama", 32),
    "gpt2-small T=16": ("gpt2", 16),
}
HEAD_CONFIGS = ["gpt2-small T=8", "gpt2-small T=16"]


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


def matmul_rate(model, tokens, device, repeats=3):
    """FLOP/s of this machine on the model's block matmuls (every Linear / Conv1D of
    the first block) at ``tokens`` rows, measured now: the rate the floor is run at."""
    block = find_layers(model)[0]
    shapes = []
    for m in block.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and type(m).__name__ in ("Linear",
                                                                                  "Conv1D"):
            k, n = (w.shape[1], w.shape[0]) if type(m).__name__ == "Linear" else tuple(w.shape)
            shapes.append((k, n))
    dtype = next(model.parameters()).dtype
    total_flops = total_s = 0.0
    for k, n in shapes:
        x = torch.randn(tokens, k, dtype=dtype, device=device)
        w = torch.randn(k, n, dtype=dtype, device=device)
        x @ w
        best = min(timed(lambda: x @ w, device)[1] for _ in range(repeats))
        total_flops += 2 * tokens * k * n
        total_s += best
    return total_flops / total_s, {"tokens": tokens, "shapes": shapes}


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
    from .memory import can_measure, peak_above_baseline_mb
    model = build_model(kind, device)
    cfg = model.config
    L = len(find_layers(model))
    sites = (L + 1) * T
    clean, corrupt, metric = make_pairs(model, pairs, T, device)
    sweep = dict(progress=False, memory_budget_mb=memory_budget_mb)
    forms = {
        "auto": lambda: steerops.patching_sweep(model, clean, corrupt, metric, **sweep),
        "reuse": lambda: steerops.patching_sweep(model, clean, corrupt, metric, reuse="full",
                                                 **sweep),
        "plain": lambda: steerops.patching_sweep(model, clean, corrupt, metric, reuse="none",
                                                 **sweep),
        "hook_one_site": lambda: hook_one_site(model, clean, corrupt, metric),
        "hook_batched_layer": lambda: hook_batched_layer(model, clean, corrupt, metric),
    }
    out = {"config": name, "model": kind, "tokens": T, "pairs": pairs, "layers": L,
           "sites": sites, "forms": {}}
    # untimed: the steerops forms' FLOPs (FlopCounterMode) and peak memory, and the
    # cost model's calibration (once per process) outside the timed rounds
    measure_memory = device.type == "cpu" and can_measure()
    # the cost model calibrates on first use: here, not under FlopCounterMode below
    # (which slows every op down and would skew the rates auto chooses by)
    from steerops.sweeps.costs import machine_costs
    out["cost_model"] = machine_costs(model)
    for form in ("auto", "reuse", "plain"):
        entry = out["forms"][form] = {}
        with FlopCounterMode(display=False) as counter:
            forms[form]()
        entry["flops_run"] = int(counter.get_total_flops())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            forms[form]()
            entry["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        elif measure_memory:
            entry["peak_rss_above_baseline_mb"] = peak_above_baseline_mb(forms[form])[1]
    times, results = interleaved(forms, repeats, device)
    raws = {f: (r.raw.cpu() if hasattr(r, "raw") else r.cpu()) for f, r in results.items()}
    for form in forms:
        runs = times[form]
        q = statistics.quantiles(runs, n=4) if len(runs) > 1 else [runs[0]] * 3
        entry = out["forms"].setdefault(form, {})
        entry.update(median_s=statistics.median(runs), iqr_s=[q[0], q[2]], runs=runs,
                     sites_per_s=pairs * sites / statistics.median(runs),
                     over_reuse=round_ratios(times, form, "reuse"),
                     # every form computes the same effects (fp32; batch composition moves
                     # the last bits)
                     max_abs_diff_vs_plain=float((raws[form] - raws["plain"]).abs().max()))
        if hasattr(results[form], "extra"):
            entry["reuse_report"] = results[form].extra["reuse"]
            entry["plan_why"] = results[form].extra["plan"]["why"]
    out["auto_chose"] = out["forms"]["auto"]["reuse_report"]["mode"]
    out["auto_over_plain"] = round_ratios(times, "auto", "plain")
    reuse = out["forms"]["reuse"]
    out["flops_floor"] = patching_floor_flops(cfg, T, pairs, first_diff=2)
    out["flops_plain_analytic"] = pairs * (2 + sites) * analytic_forward_flops(cfg, T)
    out["flops_reuse_analytic"] = reuse_sweep_flops(cfg, reuse["reuse_report"], pairs, T)
    out["flops_run_over_floor"] = reuse["flops_run"] / out["flops_floor"]
    # the limit: the floor's FLOPs at this machine's matmul rate, measured in this run
    rate, shapes = matmul_rate(model, min(4096, 16 * T), device)
    out["matmul_gflops"], out["matmul_shapes"] = rate / 1e9, shapes
    out["floor_s"] = out["flops_floor"] / rate
    for form in ("auto", "reuse"):
        out["forms"][form]["over_floor_s"] = out["forms"][form]["median_s"] / out["floor_s"]
    return out


def markdown(result):
    lines = [f"Patching sweep forms side by side ({result['environment']['device']}, torch "
             f"threads {result['threads']}, torch {result['environment']['torch']}, "
             f"transformers {result['environment']['transformers']}, commit "
             f"{result['environment']['commit']}); {result['repeats']} interleaved rounds "
             f"(every form once per round, order rotated). 'x reuse' is the median of the "
             f"per-round ratios [min, max over rounds].", "",
             "| config | pairs x sites | form | seconds (median) | sites/s | x reuse "
             "[range] | FLOPs run / floor | peak MB above baseline | max diff vs plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        for form, e in c["forms"].items():
            ratio = (f"{e['flops_run'] / c['flops_floor']:.2f}" if "flops_run" in e
                     else f"{c['flops_plain_analytic'] / c['flops_floor']:.2f} (analytic)")
            r = e["over_reuse"]
            mem = e.get("peak_memory_mb", e.get("peak_rss_above_baseline_mb"))
            label = f"auto (took {c['auto_chose']})" if form == "auto" else form
            lines.append(f"| {c['config']} | {c['pairs']} x {c['sites']} | {label} | "
                         f"{e['median_s']:.2f} | {e['sites_per_s']:.1f} | {r['median']:.2f}x "
                         f"[{r['min']:.2f}, {r['max']:.2f}] | {ratio} | "
                         f"{'-' if mem is None else f'{mem:.0f}'} | "
                         f"{e['max_abs_diff_vs_plain']:.1e} |")
    lines += ["", "The limit: the floor's FLOPs at this machine's matmul rate on the model's "
              "block matmuls, measured in the same run.", "",
              "| config | matmul GFLOP/s (tokens) | floor FLOPs | floor time s | auto / floor "
              "time | reuse / floor time | auto / plain [range] |", "|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        a = c["auto_over_plain"]
        lines.append(f"| {c['config']} | {c['matmul_gflops']:.1f} ({c['matmul_shapes']['tokens']}) "
                     f"| {c['flops_floor']:.3g} | {c['floor_s']:.2f} | "
                     f"{c['forms']['auto']['over_floor_s']:.2f}x | "
                     f"{c['forms']['reuse']['over_floor_s']:.2f}x | {a['median']:.2f}x "
                     f"[{a['min']:.2f}, {a['max']:.2f}] |")
    if result["environment"]["device"].startswith("cpu"):
        lines += ["", "Peak MB on CPU: the process's resident peak above what it held "
                  "before the sweep (/proc VmHWM, reset per measurement), glibc's default "
                  "allocator."]
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
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="interleaved rounds: timed runs per form (default: 3)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads, set explicitly and recorded (default: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   type=device, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--sites", choices=("resid", "head_out"), default="resid",
                   help="resid (default: every residual site, the configs above) or head_out "
                        "(attention heads by position and at every position against a "
                        "one-site-per-forward hook loop; GPT-2-small at T = 8 and 16)")
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
    if args.sites == "head_out":
        return _heads_main(args, repeats, device)
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


def _heads_main(args, repeats, device):
    from .head_patching import head_markdown, run_head_config
    configs = ["gpt2-small T=8"] if args.quick else (
        args.configs if args.configs != list(CONFIGS) else HEAD_CONFIGS)
    result = {"environment": environment(), "threads": torch.get_num_threads(),
              "repeats": repeats, "sites": "head_out", "configs": []}
    for name in configs:
        kind, T = CONFIGS[name]
        print(f"{name} (head_out) ...", file=sys.stderr, flush=True)
        model = build_model(kind, device)
        clean, corrupt, metric = make_pairs(model, args.pairs, T, device)
        result["configs"].append(run_head_config(name, model, clean, corrupt, metric, repeats,
                                                 device))
        del model
        save_results(args.out, "head_patching", result, head_markdown(result))
    print(head_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
