"""The cost model and timing of patching sweeps on this machine: the one place that
times things (``timed``, ``best_seconds``), the plan's calibration (``calibrate``),
and the choice of ``reuse='auto'`` (``cheaper_plan``). The reuse
form runs many small forwards (few FLOPs, many block calls), the plain form a few
large ones (more FLOPs, few calls). Which is cheaper depends on the prompt length,
the model and the device, so it is measured, once per model, device and thread
count, on the model itself:

- per block call: a one-token forward of one row, divided by the block count (reading
  every weight once, plus dispatch: what a forward that runs few tokens pays for
  each block it runs);
- per FLOP: a forward of 4 rows x 16 tokens less that one-token forward, over its
  FLOPs (matmuls, attention and the elementwise work, at a batch where the weights
  are read once);
- per reuse forward: one patched forward of the reuse form, timed directly over the
  base run of one 2-token pair at the last layer, where every block is stood in for
  (less the blocks it runs when blocks cannot be stood in for): cache selection,
  stand-in blocks, hooks, the head's input: the Python work of every reuse forward.

A plan's time is then ``block_calls x per_call + FLOPs x per_flop (+ forwards x
per_reuse_forward for the reuse forms)``. The calibration costs a few forwards
(~0.3 s for GPT-2-small on one CPU thread) and is kept for the process.
"""
import time

import torch

from ..model.blocks import find_layers, model_device
from ..model.inputs import model_output, select_rows
from . import flops as F
from .reuse import prepare_base_run
from .reuse_forward import crop_cache, patched_metric

_MEASURED = {}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn's result, its wall seconds), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def best_seconds(fn, device, repeats=3):
    """The fastest of ``repeats`` timed runs of ``fn``."""
    return min(timed(fn, device)[1] for _ in range(repeats))


def machine_costs(model, layers_path=None):
    """{'s_per_flop', 's_per_block_call', 's_per_reuse_forward', 'gflops'} for this
    model on its device at the current thread count (measured on first use, then
    cached)."""
    device = model_device(model)
    param = next(model.parameters())
    key = (id(model), str(device), torch.get_num_threads(), param.dtype)
    if key in _MEASURED:
        return _MEASURED[key]
    if _dispatch_mode_active():
        # a mode that intercepts every op (FlopCounterMode, a profiler's) would be
        # timed with the model: measure, but do not keep the skewed figures
        return _measure(model, layers_path, device)
    _MEASURED[key] = _measure(model, layers_path, device)
    return _MEASURED[key]


def _dispatch_mode_active():
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # not in this torch: assume none
        return False
    return _get_current_dispatch_mode() is not None


def _measure(model, layers_path, device):
    cfg = model.config
    L = len(find_layers(model, layers_path))
    one = torch.zeros(1, 1, dtype=torch.long, device=device)
    mid = torch.zeros(4, 16, dtype=torch.long, device=device)
    with torch.no_grad():
        model(one, use_cache=False)  # first call: lazy initialisation, not overhead
        t1 = best_seconds(lambda: model(one, use_cache=False), device)
        t_mid = best_seconds(lambda: model(mid, use_cache=False), device, repeats=2)
    flops = 4 * F.analytic_forward_flops(cfg, 16)
    s_per_flop = max(t_mid - t1, 1e-9) / flops
    per_call = t1 / L
    costs = {"s_per_flop": s_per_flop, "s_per_block_call": per_call,
             "s_per_reuse_forward": _reuse_forward_seconds(model, layers_path, L, per_call,
                                                           device),
             "gflops": 1e-9 / s_per_flop, "device": str(device),
             "threads": torch.get_num_threads()}
    return costs


def _reuse_forward_seconds(model, layers_path, L, per_call, device):
    """What one reuse forward costs beyond its blocks (cache selection, stand-in
    blocks, hooks, the head's input), timed directly: the base run of one 2-token pair,
    then its patched forward at the last layer, from column 1 over the cached prefix,
    where every block is stood in for (less the blocks it runs when they cannot be)."""
    target = {"input_ids": torch.tensor([[3, 2]], device=device)}

    def metric(logits, pair_index):
        return logits[:, -1, 0] - logits[:, -1, 1]
    metric.positions = (-1,)
    with torch.no_grad():
        base, hidden, _, cache, _ = prepare_base_run(
            model, target, metric, [L], mode="full", model_output=model_output,
            layers_path=layers_path)
        prefix = crop_cache(cache, 1) if cache is not None else None
        start = 1 if prefix is not None else 0
        rows, cols = torch.tensor([0], device=device), torch.tensor([1], device=device)
        source = hidden[L][rows, cols]

        def forward():
            return patched_metric(base, rows, cols, start, L, source, hidden[L], prefix)
        forward()  # first call: lazy initialisation
        seconds = best_seconds(forward, device)
    blocks_run = 0 if base.skip_layers else L
    return max(0.0, seconds - blocks_run * per_call)


# Estimates against runs (GPT-2-small, 2 pairs, 1 CPU thread): reuse 0.81 s vs 0.99 s
# run at T=4, 2.30 vs 2.63 at T=8, 3.43 vs 3.32 at T=12, 11.6 vs 11.6 at T=32; plain
# 0.69 vs 0.86, 2.25 vs 2.76, 4.80 vs 7.0, 32.6 vs 46. Both run low at short prompts,
# so 'auto' takes the reuse form only when its estimate is clearly below the plain
# one: near a tie, plain's few large forwards are the safer side. (Those estimates
# read the per-reuse-forward cost off two whole sweeps; it is now one patched forward
# timed directly, which leaves out the chunking and cache crops a sweep also pays:
# to be re-measured against runs with `steerops bench patching --estimate`.)
REUSE_MARGIN = 0.85


def plan_seconds(plan, costs):
    """Estimated seconds of a plan's sweep (block calls, FLOPs, reuse forwards)."""
    seconds = plan.block_calls * costs["s_per_block_call"] + \
        plan.flops["plan"] * costs["s_per_flop"]
    if plan.form != "none":
        seconds += plan.forwards * costs["s_per_reuse_forward"]
    return seconds


def cheaper_plan(reuse_plan, plain_plan):
    """The cheaper of the reuse and plain plans by this machine's cost model, with the
    reason (``reuse='auto'``)."""
    costs = machine_costs(reuse_plan.model, reuse_plan.layers_path)
    full, plain = plan_seconds(reuse_plan, costs), plan_seconds(plain_plan, costs)
    chosen = reuse_plan if full <= REUSE_MARGIN * plain else plain_plan
    chosen.why = (f"auto: the cost model (steerops.sweeps.costs) takes {chosen.form} on this model "
                  f"at T={reuse_plan.T} (full only when its estimate is below "
                  f"{REUSE_MARGIN:g} x plain's): full ~{full:.3g} s "
                  f"({reuse_plan.block_calls} block calls, {reuse_plan.flops['plan']:.3g} FLOPs) "
                  f"vs none ~{plain:.3g} s ({plain_plan.block_calls} block calls, "
                  f"{plain_plan.flops['plan']:.3g} FLOPs) at {costs['gflops']:.3g} GFLOP/s and "
                  f"{costs['s_per_block_call'] * 1e3:.3g} ms per block call")
    chosen.cost_model = {"full_s": full, "none_s": plain, **costs}
    return chosen


def calibrate(plan, repeats=2):
    """Estimated seconds for ``plan``'s sweep on its device, from a short calibration:
    forwards of 1 row and of a full batch of the real inputs (the fastest of the
    ``repeats`` timings after the first), fitted as a fixed cost per block call
    (Python and launch overhead: a forward that skips blocks pays for the ones it
    runs) plus a rate per FLOP, applied to the plan's block calls and FLOPs. Returns
    (seconds, the estimate record)."""
    model, cfg = plan.model, plan.model.config
    device = model_device(model)
    target = plan.clean if plan.noising else plan.corrupt
    # 1 row, and the plan's own batch (at most 64 rows): a rate per FLOP read off
    # small batches would miss what large ones cost (cache misses, memory traffic)
    widest = max((min(plan.batch_size, r.numel()) for _, _, _, r, _, _ in plan.chunks),
                 default=min(plan.batch_size, plan.sites))
    sizes = sorted({1, max(1, min(widest, 64))})
    seconds = {}
    with torch.no_grad():
        for b in sizes:
            batch = select_rows(target, torch.arange(b, device=device) % plan.pairs)
            runs = [timed(lambda: model_output(model(**batch)), device)[1]
                    for _ in range(repeats)]
            seconds[b] = min(runs[1:] or runs)
    fwd = F.analytic_forward_flops(cfg, plan.T)
    if len(sizes) > 1 and seconds[sizes[1]] > seconds[1]:
        per_flop = (seconds[sizes[1]] - seconds[1]) / ((sizes[1] - 1) * fwd)
        overhead = max(0.0, seconds[1] - per_flop * fwd)
    else:  # one size only: all of it is rate
        per_flop, overhead = seconds[1] / fwd, 0.0
    L = len(find_layers(model, plan.layers_path))
    total = plan.block_calls * overhead / L + plan.flops["plan"] * per_flop
    return total, {"seconds": total, "per_block_call_s": overhead / L,
                   "s_per_gflop": per_flop * 1e9, "calibration_forwards": len(sizes) * repeats,
                   "device": str(device), "threads": torch.get_num_threads()}
