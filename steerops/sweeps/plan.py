"""A patching sweep's plan, computed from the inputs without running the model: the
sites, which are identical in the two runs (skipped), the form the sweep takes and
why, its forwards and batches, work units, analytic FLOPs against naive-batched
patching and the floor, memory, and (after a short calibration) an estimated time.

``steerops.patching_sweep(...)`` is ``plan_sweep(...)`` then
``steerops.sweeps.patching.execute(plan)``; ``plan.describe()`` prints the plan.
"""
import math
from dataclasses import dataclass, field

import torch

from ..model.blocks import find_layers, hidden_size, model_device
from ..model.inputs import aligned_pairs, batch_shape, positive_int, resolve_positions, select_rows
from ..model.metrics import as_metric, check_metric_pairs
from ..model.pairs import prompt_pairs
from ..model.sites import PATCHABLE, RESID, resolve_site_layers, site_kind
from . import costs
from . import flops as F
from .reuse import choose_form, group_chunks, last_position_head

FORM_TEXT = {
    "full": "KV prefix reused, blocks before the site skipped, LM head at the metric's "
            "position",
    "prefix": "KV prefix reused, every block run",
    "none": "plain batched: every (pair, site) row a full forward",
}


def auto_batch_size(model, T, memory_budget_mb, head_tokens=None):
    """Rows per forward that keep a batch's live activations within the budget."""
    return max(1, int(memory_budget_mb * 2**20 // max(row_bytes(model, T, head_tokens), 1)))


def row_bytes(model, T, head_tokens=None):
    """Peak memory of one sequence in an inference forward without a KV cache, as the
    process's resident set sees it: per token 16 D-wide and 8 MLP-wide tensors (the
    MLP's activation runs as several elementwise temporaries; the first large batch
    of a process also pays the allocator's growth: measured on CPU at GPT-2-small
    shapes, T = 32, up to 138 kB per token against 147 kB from this rule), the
    attention scores (heads x T per token, eager attention keeps ~3 such), and fp32
    logits at ``head_tokens`` positions (default all T) with up to three temporaries
    of their size (softmax, casts: transformers 4.48's GPT-2 peaked at ~12 MB per row
    at T = 16, V = 50257, four logits-sized tensors)."""
    cfg = getattr(model, "config", None)
    D = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    V = getattr(cfg, "vocab_size", 0) or 0
    H = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1) or 1
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * D
    elem = next(model.parameters()).element_size()
    head_tokens = T if head_tokens is None else head_tokens
    return T * ((16 * D + 8 * inter) + 3 * H * T) * elem + head_tokens * V * 4 * 4


def _tokens(inputs):
    t = inputs.get("input_ids", inputs.get("inputs_embeds"))
    return t if t.dim() == 2 else t.flatten(2)


@dataclass
class SweepPlan:
    """What a sweep will do and cost; build it with :func:`plan_sweep`."""
    model: object
    clean: dict
    corrupt: dict
    metric: object
    layers: list
    positions: torch.Tensor
    noising: bool
    form: str
    why: str
    batch_size: int
    memory_budget_mb: float
    layers_path: str = None
    distributed: object = None
    shard_dir: str = None
    pairs_per_unit: int = None
    pairs: int = 0
    T: int = 0
    differing: dict = field(default_factory=dict, repr=False)  # (li, j) -> pair rows
    chunks: list = field(default_factory=list, repr=False)
    forwards: int = 0
    rows: int = 0
    block_calls: int = 0  # blocks run, summed over forwards (skipped blocks cost ~nothing)
    flops: dict = field(default_factory=dict)
    memory_mb: dict = field(default_factory=dict)
    estimate: dict = None
    tokens: tuple = field(default=None, repr=False)  # (clean, corrupt) token strings per pair
    cost_model: dict = None  # reuse='auto': both forms' estimated seconds and the rates
    kind: object = RESID     # the site kind (steerops.model.sites)
    per_position: bool = True
    units_per_position: int = 1  # heads for head_out

    # ------------------------------------------------------------------ counts
    @property
    def sites(self):
        """(pair, site) rows asked for: pairs x layers x positions (x heads for
        head_out; positions count once with ``per_position=False``)."""
        columns = self.positions.numel() if self.per_position else 1
        return self.pairs * len(self.layers) * columns * self.units_per_position

    @property
    def identical(self):
        """(pair, site) rows whose source and base activations are identical (the
        patch changes nothing): skipped by the reuse forms, run by the plain one."""
        return self.sites - sum(int(r.numel()) for r in self.differing.values())

    @property
    def split(self):
        """Whether the sweep runs as work units (ranks or shards on disk)."""
        from .distributed import active
        return active(self.distributed) or self.shard_dir is not None

    def units(self):
        """Work units (first pair, end pair, layer) and their costs (pairs x the blocks
        after the layer and the two base runs), as the distributed path splits them."""
        block = self.pairs_per_unit or self.pairs
        L_max = max(self.layers)
        units = [(a, min(a + block, self.pairs), l) for a in range(0, self.pairs, block)
                 for l in self.layers]
        return units, [(b - a) * (L_max - l + 2) for a, b, l in units]

    def subset(self, rows, layers):
        """The plan of pair ``rows`` and ``layers`` alone, run in this process."""
        return plan_sweep(self.model, select_rows(self.clean, rows),
                          select_rows(self.corrupt, rows), _rows_metric(self.metric, rows),
                          layers, self.positions, noising=self.noising, reuse=self.form,
                          batch_size=self.batch_size, memory_budget_mb=self.memory_budget_mb,
                          layers_path=self.layers_path, distributed=False, sites=self.kind,
                          per_position=self.per_position)

    # ------------------------------------------------------------------ time
    def calibrate(self, repeats=2):
        """Estimated seconds for the sweep on this device (``steerops.sweeps.costs.calibrate``:
        a short calibration on the real inputs). Sets ``plan.estimate``."""
        total, self.estimate = costs.calibrate(self, repeats)
        return total

    # ------------------------------------------------------------------ output
    def summary(self):
        """The plan as a plain dict (for results and JSON)."""
        return {"site_kind": self.kind.name, "per_position": self.per_position,
                "pairs": self.pairs, "tokens": self.T, "layers": list(self.layers),
                "positions": self.positions.numel(), "sites": self.sites,
                "identical_skipped": self.identical if self.form != "none" else 0,
                "form": self.form, "why": self.why, "batch_size": self.batch_size,
                "forwards": self.forwards, "rows": self.rows, "flops": dict(self.flops),
                "memory_mb": dict(self.memory_mb), "units": len(self.units()[0]),
                "estimate": self.estimate, "cost_model": self.cost_model}

    def describe(self):
        """A short table of the plan (also returned as a string)."""
        f, m = self.flops, self.memory_mb
        skipped = self.identical if self.form != "none" else 0
        lines = [
            f"patching sweep plan ({self.kind.name} sites): {self.pairs} pairs x "
            f"{len(self.layers)} {self.kind.layer_axis}s x "
            + (f"{self.positions.numel()} positions" if self.per_position else
               f"all {self.positions.numel()} positions at once")
            + (f" x {self.units_per_position} heads" if self.units_per_position > 1 else "")
            + f" = {self.sites} (pair, site) rows",
            f"  form        {self.form}: {FORM_TEXT[self.form]} ({self.why})",
            f"  identical   {self.identical} rows (the patch changes nothing): "
            + (f"{skipped} skipped" if skipped else "run anyway (plain form)"),
            f"  forwards    {self.forwards} ({self.rows} sequences), batches of <= "
            f"{self.batch_size} rows",
            f"  FLOPs       {f['plan']:.3g} | floor {f['floor']:.3g} | naive-batched "
            f"{f['naive_batched']:.3g}  (plan / floor {f['plan'] / f['floor']:.2f})",
            f"  memory      weights {m['weights']:.0f} MB + caches {m['caches']:.0f} MB + "
            f"per batch {m['per_batch']:.0f} MB = peak ~{m['peak']:.0f} MB (estimate)",
        ]
        if self.split:
            units, _ = self.units()
            lines.append(f"  units       {len(units)} (blocks of {self.pairs_per_unit or self.pairs}"
                         f" pairs x 1 layer) over ranks / shards")
        if self.estimate is not None:
            e = self.estimate
            lines.append(f"  est. time   {e['seconds']:.3g} s on {e['device']} ({e['threads']} "
                         f"threads; calibrated on {e['calibration_forwards']} forwards)")
        text = "\n".join(lines)
        print(text)
        return text


def _rows_metric(metric, rows):
    """``metric`` seen from a block of pairs: pair i of the block is pair rows[i]."""
    def sub(logits, pair_index):
        return metric(logits, rows.to(pair_index.device)[pair_index])
    sub.positions = getattr(metric, "positions", None)
    sub.num_pairs = None
    return sub


def plan_sweep(model, clean, corrupt=None, metric=None, layers=None, positions=None, *,
               noising=False,
               reuse="auto", batch_size=None, memory_budget_mb=1024, layers_path=None,
               distributed=None, shard_dir=None, pairs_per_unit=None, tokenizer=None,
               sites="resid", per_position=True):
    """The plan of ``patching_sweep`` with the same arguments, without running the
    model (see :class:`SweepPlan`); ``plan.calibrate()`` adds an estimated time."""
    kind = site_kind(sites, allowed=PATCHABLE)
    if not isinstance(per_position, bool):
        raise TypeError(f"per_position must be True or False, got {per_position!r}")
    if not per_position and kind.unit != "head":
        raise ValueError(f"per_position=False patches a head at every position at once: it "
                         f"needs sites='head_out', got sites={kind.name!r}")
    positive_int("batch_size", batch_size)
    positive_int("pairs_per_unit", pairs_per_unit)
    if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) \
            or not memory_budget_mb > 0 or not math.isfinite(memory_budget_mb):
        raise ValueError(f"memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
    device = model_device(model)
    layers = resolve_site_layers(model, kind, layers, layers_path)
    pairs_in = prompt_pairs(model, tokenizer, clean, corrupt, metric, device)
    clean, corrupt, metric, tokens = pairs_in.clean, pairs_in.corrupt, pairs_in.metric, \
        pairs_in.tokens
    metric = as_metric(metric)
    form, why = choose_form(model, reuse)
    clean, corrupt = aligned_pairs(clean, corrupt, device)
    pairs, T = batch_shape(clean)
    check_metric_pairs(metric, pairs)
    pos = resolve_positions(positions, T, device)
    if batch_size is None:
        head = last_position_head(model, metric) is not None
        batch_size = auto_batch_size(model, T, memory_budget_mb, 1 if head else None)
    units = 1 if kind.unit is None else kind.units(model, None)
    differing = _predicted_differing(clean, corrupt, layers, pos, kind, units, per_position)

    def build(form, why):
        rows = batch_size if form != "none" else \
            max(1, min(batch_size, pairs * len(layers) * pos.numel()))
        plan = SweepPlan(model, clean, corrupt, metric, layers, pos, noising, form, why, rows,
                         memory_budget_mb, layers_path, distributed, shard_dir, pairs_per_unit,
                         pairs=pairs, T=T, tokens=tokens, kind=kind, per_position=per_position,
                         units_per_position=units)
        plan.differing = differing
        _count(plan)
        return plan
    plan = build(form, why)
    if reuse == "auto" and form == "full":
        if plan.split:
            # a timed choice could differ between ranks (they must run the same form)
            # and between a run and its resume (shards are keyed by the form)
            plan.why = ("auto: a causal LM on one device; the sweep is split over ranks / "
                        "shards, where every process must choose alike: the reuse form")
        else:
            plan = costs.cheaper_plan(plan, build("none", ""))
    return plan


def _predicted_differing(clean, corrupt, layers, pos, kind=RESID, units=1, per_position=True):
    """Rows (pair * units + unit) whose site differs between the two runs, from the
    inputs: on the residual stream at the embeddings (layer 0) where the tokens differ;
    at later layers, and at every component, of a causal LM from the first differing
    token on (with ``per_position=False`` a site sits at the first requested position
    from there). (The reuse sweep compares the activations themselves; for a causal LM
    the two agree.)"""
    a, b = _tokens(clean), _tokens(corrupt)
    token_differs = (a != b) if a.dim() == 2 else (a != b).any(-1)
    T = token_differs.shape[1]
    first = torch.where(token_differs.any(1), token_differs.float().argmax(1),
                        torch.full_like(token_differs[:, 0], T, dtype=torch.long))
    first = first.to(pos.device)
    cols = pos.tolist()
    # per pair, the index of the earliest requested column at or after `first`
    earliest = [min((k for k, c in enumerate(cols) if c >= f), key=lambda k: cols[k],
                    default=-1) for f in first.tolist()]
    out = {}
    for li, l in enumerate(layers):
        for j, c in enumerate(cols):
            if not per_position:
                differs = torch.tensor([k == j for k in earliest], device=pos.device)
            elif kind.from_embeddings and l == 0:
                differs = token_differs[:, c].to(pos.device)
            else:
                differs = first <= c
            rows = differs.nonzero().flatten().to(pos.device)
            out[li, j] = (rows[:, None] * units + torch.arange(units, device=pos.device)
                          ).flatten()
    return out


def _count(plan):
    """Forwards, rows, FLOPs and memory of the plan's form."""
    model, cfg, pairs, T = plan.model, plan.model.config, plan.pairs, plan.T
    L = len(find_layers(model, plan.layers_path))
    fwd = F.analytic_forward_flops(cfg, T)
    base = 2 * pairs * fwd
    D = hidden_size(model)
    V = getattr(cfg, "vocab_size", 0) or 0
    if plan.form == "none":
        batches = math.ceil(plan.sites / plan.batch_size)
        plan.forwards, plan.rows = 2 + batches, 2 * pairs + plan.sites
        plan.block_calls = plan.forwards * L
        head_last = last_position_head(model, plan.metric) is not None
        row_flops = F.analytic_forward_flops(cfg, T, lm_head=False) + \
            2 * D * V * (1 if head_last else T)
        plan_flops = base + plan.sites * row_flops
    else:
        plan.chunks = group_chunks(plan.differing, plan.layers, plan.positions, T)
        head = getattr(plan.metric, "positions", None) == (-1,)
        skip = plan.form == "full"  # blocks that return their cache run (told after the run)
        token_layers = head_tokens = batches = rows = 0
        plan.block_calls = 2 * L
        for _, l, start, r, _, _ in plan.chunks:
            n = r.numel()
            batches += math.ceil(n / plan.batch_size)
            plan.block_calls += math.ceil(n / plan.batch_size) * (L - l if skip else L)
            rows += n
            token_layers += n * (T - start) * (L - l if skip else L)
            head_tokens += n * (1 if head else T - start)
        plan.forwards, plan.rows = 2 + batches, 2 * pairs + rows
        plan_flops = base + token_layers * F.token_layer_flops(cfg, T) + head_tokens * 2 * D * V
    # per pair, the (layer, position) of each differing site (rows are pair * units +
    # unit); a component site in block b is priced as blocks b..L-1 from its position
    # on (an upper bound), a head at every position from the first that differs
    per_pair_sites = {}
    for (li, j), r in plan.differing.items():
        for v in r.tolist():
            per_pair_sites.setdefault(v // plan.units_per_position, []).append(
                (plan.layers[li], int(plan.positions[j])))
    floor = base + sum(F.site_floor_flops(cfg, T, s) for s in per_pair_sites.values())
    plan.flops = {"plan": float(plan_flops), "floor": float(floor),
                  "naive_batched": float(base + plan.sites * fwd)}
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    store = pairs * len(plan.layers) * plan.positions.numel() * D * elem
    caches = store
    if plan.form != "none":  # the base run's hidden states, KV cache (and one crop), logits
        kv = 2 * L * T * D * elem
        caches += pairs * (len(plan.layers) * T * D * elem + 2 * kv + T * V * 4)
    head = last_position_head(model, plan.metric) is not None
    per_batch = plan.batch_size * row_bytes(model, T, 1 if head else None)
    mb = 2 ** 20
    plan.memory_mb = {"weights": weights / mb, "caches": caches / mb, "per_batch": per_batch / mb,
                      "peak": (weights + caches + per_batch) / mb}
