"""A cost model of patching sweeps on this machine, for ``reuse='auto'``: the reuse
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
- per reuse forward: the difference of two real reuse sweeps of one 2-token pair,
  with one patched forward and with one per layer, less the blocks they run (cache
  selection, stand-in blocks, hooks: the Python work of every reuse forward).

A plan's time is then ``block_calls x per_call + FLOPs x per_flop (+ forwards x
per_reuse_forward for the reuse forms)``. The calibration costs a few forwards
(~0.3 s for GPT-2-small on one CPU thread) and is kept for the process.
"""
import time

import torch

from . import flops as F
from .models import find_layers, model_device

_MEASURED = {}


def _seconds(fn, device, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


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
        t1 = _seconds(lambda: model(one, use_cache=False), device)
        t_mid = _seconds(lambda: model(mid, use_cache=False), device, repeats=2)
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
    blocks, hooks, the head's batching), from two real reuse sweeps of one 2-token
    pair: one patched forward and L (one per layer); their difference is L - 1
    forwards and the blocks they run."""
    from .patching import patching_sweep
    clean = torch.tensor([[1, 2]], device=device)
    corrupt = torch.tensor([[3, 2]], device=device)

    def metric(logits, pair_index):
        return logits[:, -1, 0] - logits[:, -1, 1]
    metric.positions = (-1,)

    def sweep(layers):
        return lambda: patching_sweep(model, clean, corrupt, metric, layers, [1],
                                      reuse="full", progress=False, layers_path=layers_path,
                                      distributed=False)  # this process alone
    few = _seconds(sweep([L]), device, repeats=2)  # the patched forward runs no block
    every = list(range(1, L + 1))
    many = _seconds(sweep(every), device, repeats=2)
    blocks = sum(L - l for l in every)
    return max(0.0, (many - few - blocks * per_call) / max(len(every) - 1, 1))


# Estimates against runs (GPT-2-small, 2 pairs, 1 CPU thread): reuse 0.81 s vs 0.99 s
# run at T=4, 2.30 vs 2.63 at T=8, 3.43 vs 3.32 at T=12, 11.6 vs 11.6 at T=32; plain
# 0.69 vs 0.86, 2.25 vs 2.76, 4.80 vs 7.0, 32.6 vs 46. Both run low at short prompts,
# so 'auto' takes the reuse form only when its estimate is clearly below the plain
# one: near a tie, plain's few large forwards are the safer side.
REUSE_MARGIN = 0.85


def plan_seconds(plan, costs):
    """Estimated seconds of a plan's sweep (block calls, FLOPs, reuse forwards)."""
    seconds = plan.block_calls * costs["s_per_block_call"] + \
        plan.flops["plan"] * costs["s_per_flop"]
    if plan.form != "none":
        seconds += plan.forwards * costs["s_per_reuse_forward"]
    return seconds
