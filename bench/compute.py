"""Compute accounting: FLOPs counted by FlopCounterMode, analytic FLOPs, wall time.

A :class:`Ledger` records each stage of a method (how many sequences of how
many tokens went forward / backward, whether the LM head ran) with the FLOPs
FlopCounterMode counted for it and its wall time.
"""
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from steerops.sweeps.costs import timed

from .memory import profiled_peak_mb

# the analytic FLOP model lives with the library (steerops.plan_sweep prices a sweep
# before it runs); the benchmark reads the same functions
from steerops.sweeps.flops import analytic_forward_flops


@dataclass
class Stage:
    name: str
    sequences: int          # sequences forwarded
    tokens: int             # tokens per sequence
    lm_head: bool = True
    backward: bool = False  # a backward pass per forward, to the activations only
    counted_flops: int = 0  # FlopCounterMode
    seconds: float = 0.0    # median wall time
    seconds_q1: float = float("nan")  # interquartile range of the timed repeats
    seconds_q3: float = float("nan")
    repeats: int = 0
    peak_memory_mb: float = None  # CUDA allocator peak, or on CPU the peak of the stage's
    # tensor allocations (torch profiler memory events), during the counted run
    side: str = ""
    extra_forwards: int = 0  # further forward-only sequences in the same stage (e.g. AtP's clean run)
    analytic_override: float = None  # analytic FLOPs of a stage that is no plain forward
    floor_flops: float = None  # analytic FLOPs of the stage's cheapest correct form, where
    # that is not the form that ran (S1-exact's steered forwards run plain)


@dataclass
class Ledger:
    config: object
    stages: list = field(default_factory=list)

    def run(self, name, fn, *, sequences, tokens, lm_head=True, backward=False, side="",
            repeats=1, device=None, extra_forwards=0, memory=True):
        """Runs ``fn`` once under FlopCounterMode (its result is returned), then
        ``repeats`` more times for the median wall time. ``memory``: read the stage's
        peak memory (CUDA: the allocator's peak over the counted run; CPU: one more
        run under the torch profiler, see below)."""
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with FlopCounterMode(display=False) as counter:
            result = fn()
        peak = None
        if cuda and memory:
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        elif memory:
            # CPU: the peak of the stage's own tensor allocations, from the profiler's
            # memory events, in a run of its own: under FlopCounterMode's dispatch mode the
            # profiler reads S2's optimisation at 550 MB where the stage alone peaks at
            # 87 MB (the caches, the gradient pass and patching read the same either way)
            peak = profiled_peak_mb(fn)[1]
        on = torch.device(device) if device is not None else torch.device("cpu")
        times = [timed(fn, on)[1] for _ in range(repeats)]
        q1, q3 = (float(np.percentile(times, 25)), float(np.percentile(times, 75))) if times \
            else (float("nan"), float("nan"))
        self.stages.append(Stage(
            name, sequences, tokens, lm_head, backward,
            counted_flops=int(counter.get_total_flops()),
            seconds=statistics.median(times) if times else float("nan"), side=side,
            extra_forwards=extra_forwards, seconds_q1=q1, seconds_q3=q3, repeats=len(times),
            peak_memory_mb=peak))
        return result

    def amend(self, name, **fields):
        """Sets fields of the last stage called ``name`` (e.g. once its result
        says how much work it did)."""
        stage = next(s for s in reversed(self.stages) if s.name == name)
        for key, value in fields.items():
            setattr(stage, key, value)

    def analytic(self, stage):
        if stage.analytic_override is not None:
            return stage.analytic_override
        per = analytic_forward_flops(self.config, stage.tokens, stage.lm_head)
        # the backward passes here take gradients w.r.t. activations or a steering vector,
        # never the weights: about one forward's worth of FLOPs (not two)
        return stage.sequences * per * (2 if stage.backward else 1) + stage.extra_forwards * per

    def as_dicts(self):
        return [dict(vars(s), analytic_flops=self.analytic(s)) for s in self.stages]


def meta_forward_flops(model_factory, tokens):
    """FlopCounterMode FLOPs of one forward of one sequence, with fake tensors
    (shapes only: no memory, no time, so large configs count on any machine).

    Fake CPU tensors rather than the meta device: some transformers releases
    (4.48-4.57 Llama rotary embeddings) enter ``torch.autocast`` on the
    tensors' device type, which the meta device does not support.
    """
    with FakeTensorMode():
        model = model_factory()
        ids = torch.zeros(1, tokens, dtype=torch.long)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(ids)
    return int(counter.get_total_flops())
