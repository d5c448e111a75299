"""Compute accounting: FLOPs counted by FlopCounterMode, analytic FLOPs, wall time.

A :class:`Ledger` records each stage of a method (how many sequences of how
many tokens went forward / backward, whether the LM head ran) with the FLOPs
FlopCounterMode counted for it and its wall time.
"""
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode


def analytic_forward_flops(config, tokens, lm_head=True):
    """2 x multiply-adds of one forward over ``tokens`` positions of one sequence.

    Llama/Mistral-style (q, k, v, o projections, gated MLP) or GPT-2 style
    (fused qkv, 4x MLP); attention scores and the weighted sum included.
    """
    T = tokens
    d = getattr(config, "hidden_size", None) or config.n_embd
    L = getattr(config, "num_hidden_layers", None) or config.n_layer
    V = config.vocab_size
    if getattr(config, "model_type", "") == "gpt2":
        inter = config.n_inner or 4 * d
        per_layer = 2 * T * d * (3 * d) + 2 * T * d * d + 2 * (2 * T * d * inter)
    else:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", heads) or heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        inter = config.intermediate_size
        per_layer = (2 * T * d * (heads * head_dim) + 2 * 2 * T * d * (kv * head_dim)
                     + 2 * T * (heads * head_dim) * d + 3 * 2 * T * d * inter)
    attention = 2 * 2 * T * T * d
    flops = L * (per_layer + attention)
    if lm_head:
        flops += 2 * T * d * V
    return flops


def _dims(config):
    d = getattr(config, "hidden_size", None) or config.n_embd
    L = getattr(config, "num_hidden_layers", None) or config.n_layer
    return d, L, config.vocab_size


def token_layer_flops(config, context):
    """FLOPs of one token through one block, attending over ``context`` tokens."""
    d, L, _ = _dims(config)
    return analytic_forward_flops(config, context, lm_head=False) / (L * context)


def reuse_sweep_flops(config, report, pairs, T):
    """Analytic FLOPs of a patching sweep with reuse, from its report: the two
    base runs, the token-layers the patched forwards ran (attention priced at the
    full context, an upper bound) and the LM-head tokens."""
    d, _, V = _dims(config)
    base = 2 * pairs * analytic_forward_flops(config, T)
    return (base + report["token_layers_run"] * token_layer_flops(config, T)
            + report["head_tokens"] * 2 * d * V)


def site_floor_flops(config, T, sites):
    """One pair's intervened runs in the cheapest correct form: per site (l, p),
    (L - l) blocks over the T - p tokens from p on (the rest is the corrupt run's,
    from its KV cache) and the LM head at the answer position only."""
    d, L, V = _dims(config)
    per = token_layer_flops(config, T)
    return sum((L - l) * (T - p) * per + 2 * d * V for l, p in sites)


def patching_forms_flops(config, T, pairs, sites):
    """Analytic FLOPs of the three forms docs/protocol.md asks to report, for ``sites``
    (the (l, p) whose patch differs from the base run), each with the two base runs:
    naive-batched (a full forward with head per site), prefix-reuse (positions >= p
    through every block, the head at the answer) and the floor (only blocks l+1..L)."""
    d, L, V = _dims(config)
    per = token_layer_flops(config, T)
    base = 2 * analytic_forward_flops(config, T)
    naive = base + len(sites) * analytic_forward_flops(config, T)
    prefix = base + sum(L * (T - p) * per + 2 * d * V for _, p in sites)
    return {"naive_batched": pairs * naive, "prefix_reuse": pairs * prefix,
            "floor": pairs * (base + site_floor_flops(config, T, sites))}


def patching_floor_flops(config, T, pairs, first_diff=0):
    """docs/protocol.md's cheapest correct patching: two base runs, then per pair and
    site (l, p) with p >= the first differing position, the site's floor."""
    _, L, _ = _dims(config)
    sites = [(l, p) for l in range(L + 1) for p in range(first_diff, T)]
    return 2 * pairs * analytic_forward_flops(config, T) + pairs * site_floor_flops(config, T,
                                                                                     sites)


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
    peak_memory_mb: float = None  # CUDA allocator peak during the counted run (None on CPU)
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
            repeats=1, device=None, extra_forwards=0):
        """Runs ``fn`` once under FlopCounterMode (its result is returned), then
        ``repeats`` more times for the median wall time."""
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with FlopCounterMode(display=False) as counter:
            result = fn()
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
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

    def totals(self, side=None, names=None):
        chosen = [s for s in self.stages if (side is None or s.side == side)
                  and (names is None or s.name in names)]
        return {"counted_flops": sum(s.counted_flops for s in chosen),
                "analytic_flops": sum(self.analytic(s) for s in chosen),
                "floor_flops": sum(self.analytic(s) if s.floor_flops is None else s.floor_flops
                                   for s in chosen),
                "seconds": sum(s.seconds for s in chosen),
                "stages": [s.name for s in chosen]}

    def as_dicts(self):
        return [dict(vars(s), analytic_flops=self.analytic(s)) for s in self.stages]


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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
