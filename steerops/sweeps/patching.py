"""Activation-patching sweeps: every requested (layer, position) site of every prompt
pair, patched one at a time, many sites per batched forward.

Sites are residual-stream (layer, position) pairs, layers numbered as in
``output_hidden_states`` (0 = embeddings .. L = output of the last block).
Metrics: :mod:`steerops.model.metrics`; inputs: :mod:`steerops.model.inputs`; caching and AtP:
:mod:`steerops.model.caching`, :mod:`steerops.sweeps.attribution`.
"""
import math
import os
from dataclasses import dataclass, field

import torch

from .. import ops
from ..model.blocks import eval_mode, model_device, model_name
from ..model.caching import capture
from ..model.inputs import batch_shape, model_output, select_rows
from ..model.metrics import check_denominator, check_finite_sites
from ..model.sites import RESID, split_units
from ..ops.backend import unchecked
from .plan import plan_sweep
from .reuse import last_position_head, reuse_sweep
from .sitemap import SiteMap


@dataclass
class PatchingResult(SiteMap):
    """effects[l, p]: normalised patching effect per site (docs/protocol.md ratio of means);
    raw[i, l, p]: the metric with that site patched, per pair. The axes follow the
    site kind (``axes()``): (block, head, position) for 'head_out', (block, head)
    with ``per_position=False``. ``top_sites(k)`` and ``plot(path)`` show the map."""
    effects: torch.Tensor
    raw: torch.Tensor
    clean_metric: torch.Tensor
    corrupt_metric: torch.Tensor
    layers: list
    positions: torch.Tensor
    noising: bool = False
    forwards: int = 0  # batched forward passes run, caches included
    rows: int = 0      # sequences forwarded, caches included
    batch_size: int = 0
    extra: dict = field(default_factory=dict)
    tokens: list = field(default=None, repr=False)          # clean token strings per pair
    corrupt_tokens: list = field(default=None, repr=False)  # (pairs, T), with a tokenizer
    sites: str = "resid"       # the site kind (steerops.model.sites); axes() names the map's axes
    per_position: bool = True  # head_out with False: a head at every position at once

    def _values(self):
        return self.effects


def patching_sweep(model, clean, corrupt=None, metric=None, layers=None, positions=None, *,
                   noising=False, reuse="auto", batch_size=None, memory_budget_mb=1024,
                   progress=True, layers_path=None, distributed=None, shard_dir=None,
                   pairs_per_unit=None, tokenizer=None, sites="resid", per_position=True):
    """Activation patching over every requested site and prompt pair.

    Denoising (default): run ``corrupt`` with h_s <- h_s(clean), one site at a
    time; noising: run ``clean`` with h_s <- h_s(corrupt).

    Args:
        clean, corrupt: (pairs, T) input_ids, or dicts of inputs of equal shape;
            or text (a string or a list of strings, one per pair) with ``tokenizer``:
            clean[i] and corrupt[i] must tokenise to the same length; pairs of
            different lengths are padded on the tokenizer's side. Or a
            :class:`~steerops.model.pairs.PromptPairs` (pairs and metric encoded once),
            with corrupt and metric left out.
        metric: ``metric(logits, pair_index) -> (rows,)`` (or of logits only);
            ``logit_diff(" Mary", " John")`` resolves its text answers through
            ``tokenizer``.
        layers: site layers (default all, 0..L); positions: columns (default all).
        reuse: 'auto' (default: 'full' for causal LMs, else 'none'), 'full'
            (skip identical sites, reuse the base run's KV-cache prefix, skip
            the blocks before the site, LM head only at the metric's last
            position), 'prefix' (the same without skipping blocks) or 'none'
            (the plain batched sweep: many (pair, site) rows per forward, one
            fused multi-site ``patch_`` launch per layer; needed for
            non-causal models). See :mod:`steerops.sweeps.reuse`.
        batch_size: rows per forward; default chosen from ``memory_budget_mb``.
        distributed: None (default: split the work when a torch.distributed
            process group with more than one rank is initialised, e.g. under
            torchrun), True (split over the group, any size) or False. Work
            units are (a block of ``pairs_per_unit`` pairs (default all) x one
            layer), assigned to ranks by cost; every rank gets the whole result.
            Under reuse, a rank's units of one block run as one sweep (sharing
            the base runs); results are bitwise the same for any world size.
        shard_dir: a folder for finished units (safetensors); a rerun with the
            same inputs loads them and runs only the missing units.
        tokenizer: a Hugging Face tokenizer: text inputs and answers, and
            ``result.tokens`` (the token string of each position) for plots.
        sites: the site kind (steerops.model.sites): 'resid' (default; layers 0..L),
            'resid_mid', 'attn_out', 'mlp_out' (blocks 0..L-1; effects (L, T)) or
            'head_out' (effects (L, H, T); with ``per_position=False`` each head at
            every requested position at once: (L, H)). Both forms take every kind: a
            component in block b at position p reruns block b from it on and the
            later blocks, at positions >= p (docs/sites.md).

    Returns a :class:`PatchingResult`: effects normalised as in docs/protocol.md,
    g_s = E[m(patched) - m(corrupt)] / E[m(clean) - m(corrupt)] (denoising) or
    E[m(clean) - m(patched)] / E[m(clean) - m(corrupt)] (noising);
    ``result.extra["reuse"]`` says what was reused and the token-layers run,
    ``result.extra["plan"]`` the plan it ran (:func:`steerops.plan_sweep`: the same
    arguments give the plan without running anything).
    """
    with eval_mode(model, "patching_sweep"):
        plan = plan_sweep(model, clean, corrupt, metric, layers, positions, noising=noising,
                          reuse=reuse, batch_size=batch_size, memory_budget_mb=memory_budget_mb,
                          layers_path=layers_path, distributed=distributed, shard_dir=shard_dir,
                          pairs_per_unit=pairs_per_unit, tokenizer=tokenizer, sites=sites,
                          per_position=per_position)
        result = execute(plan, progress=progress)
    result.extra["plan"] = plan.summary()
    if plan.tokens is not None:
        result.tokens, result.corrupt_tokens = plan.tokens
    return result


def execute(plan, progress=True):
    """Runs a :class:`~steerops.sweeps.plan.SweepPlan`: as work units over ranks / shards
    when the plan is split, else in its form (plain, or reuse)."""
    if plan.split:
        return _run_units(plan, progress)
    model, metric, layers, pos = plan.model, plan.metric, plan.layers, plan.positions
    every = torch.arange(plan.pairs, device=pos.device)
    source, target = ((plan.corrupt, plan.clean) if plan.noising
                      else (plan.clean, plan.corrupt))
    store, source_out = capture(model, source, layers, pos, plan.layers_path, False, plan.kind)
    source_metric = metric(source_out, every).float()
    if plan.form == "none":
        with torch.no_grad():
            target_metric = metric(model_output(model(**target)), every).float()
        raw, n_batches = _plain_sweep(model, store, target, metric, layers, pos,
                                      plan.batch_size, progress, plan.layers_path, plan.kind,
                                      plan.per_position)
        report = {"mode": "none", "forwards": 1 + n_batches, "rows": plan.pairs + plan.sites,
                  "lm_head_last_only": last_position_head(model, metric) is not None}
    else:
        raw, target_metric, report = reuse_sweep(
            model, store, target, metric, layers, pos, mode=plan.form,
            batch_size=plan.batch_size, model_output=model_output,
            layers_path=plan.layers_path, progress=progress, kind=plan.kind,
            per_position=plan.per_position)
    if raw.dim() == 4:  # (pairs, layers, positions or 1, units): the kind's own axes
        raw = plan.kind.arrange(raw if plan.per_position else raw.squeeze(2),
                                plan.per_position)
    clean_metric, corrupt_metric = ((target_metric, source_metric) if plan.noising
                                    else (source_metric, target_metric))
    effects = _normalised(raw, clean_metric, corrupt_metric, plan.noising, layers, pos)
    return PatchingResult(effects, raw, clean_metric, corrupt_metric, layers, pos, plan.noising,
                          forwards=1 + report["forwards"], rows=plan.pairs + report["rows"],
                          batch_size=plan.batch_size, extra={"reuse": report},
                          sites=plan.kind.name, per_position=plan.per_position)


def _normalised(raw, clean_metric, corrupt_metric, noising, layers, pos):
    denom = check_denominator(clean_metric, corrupt_metric)
    check_finite_sites(raw, layers, pos)
    if noising:
        return (clean_metric.mean() - raw.mean(0)) / denom
    return (raw.mean(0) - corrupt_metric.mean()) / denom


def _run_units(plan, progress):
    """The plan's work units (a block of pairs x one layer), split over ranks and
    gathered, or run here with shards on disk (steerops.sweeps.distributed)."""
    from tqdm.auto import tqdm

    from . import distributed as dist
    model, pos = plan.model, plan.positions
    units, costs = plan.units()
    rank, world = dist.rank_world() if dist.active(plan.distributed) else (0, 1)
    mine = dist.assign(costs, world)[rank] if world > 1 else list(range(len(units)))
    key = None
    if plan.shard_dir is not None:
        ids = [x.get("input_ids", x.get("inputs_embeds")) for x in (plan.clean, plan.corrupt)]
        options = dict(noising=plan.noising, reuse=plan.form, batch_size=plan.batch_size,
                       memory_budget_mb=plan.memory_budget_mb)
        if plan.kind.name != "resid":  # resid keys stay as they were (shards on disk)
            options.update(sites=plan.kind.name, per_position=plan.per_position)
        key = dist.fingerprint(ids[0], ids[1], plan.layers, pos,
                               plan.pairs_per_unit or plan.pairs, model_name(model), options,
                               *dist.weights_sample(model))
    done, todo = {}, {}
    for u in mine:
        path = None if key is None else os.path.join(plan.shard_dir,
                                                      f"sweep-{key}-unit{u}.safetensors")
        shard = dist.load_shard(path) if path is not None and os.path.exists(path) else None
        if shard is not None:
            done[u] = shard
        else:
            todo.setdefault(units[u][:2], []).append((u, path))
    # Under reuse, this rank's units of one pair block run as one sweep: the base runs
    # (two whole forwards) are shared, and a layer's values do not depend on the other
    # layers in the call (reuse.py: no batch mixes layers), so results stay bitwise the
    # same for any world size. The plain sweep batches sites across layers: there each
    # unit runs alone (its base runs are 2 of its P + 2 rows per pair).
    groups = [g for block in todo.values()
              for g in ([block] if plan.form != "none" else [[x] for x in block])]
    bar = tqdm(total=sum(len(g) for g in groups), disable=not (progress and dist.is_main()),
               desc="patching units")
    for group in groups:
        a, b, _ = units[group[0][0]]
        rows = torch.arange(a, b, device=model_device(model))
        r = run_group(plan.subset(rows, [units[u][2] for u, _ in group]))
        for k, (u, path) in enumerate(group):
            # the group's forwards and rows are counted once, on its first unit
            done[u] = {"raw": r.raw[:, k].float().cpu(), "clean": r.clean_metric.float().cpu(),
                       "corrupt": r.corrupt_metric.float().cpu(),
                       "forwards": torch.tensor(r.forwards if k == 0 else 0),
                       "rows": torch.tensor(r.rows if k == 0 else 0)}
            if path is not None:
                dist.save_shard(path, done[u], {"unit": units[u]})
        bar.update(len(group))
    bar.close()
    if world > 1:
        for part in dist.gather(done):
            done.update(part)
    device = model_device(model)
    site_shape = next(iter(done.values()))["raw"].shape[1:]  # a layer's sites (the kind's)
    raw = torch.empty(plan.pairs, len(plan.layers), *site_shape)
    clean_metric, corrupt_metric = torch.empty(plan.pairs), torch.empty(plan.pairs)
    for u, (a, b, layer) in enumerate(units):
        raw[a:b, plan.layers.index(layer)] = done[u]["raw"]
        clean_metric[a:b], corrupt_metric[a:b] = done[u]["clean"], done[u]["corrupt"]
    raw, clean_metric, corrupt_metric = (x.to(device) for x in (raw, clean_metric,
                                                                 corrupt_metric))
    effects = _normalised(raw, clean_metric, corrupt_metric, plan.noising, plan.layers, pos)
    return PatchingResult(
        effects, raw, clean_metric, corrupt_metric, plan.layers, pos, plan.noising,
        forwards=int(sum(int(d["forwards"]) for d in done.values())),
        rows=int(sum(int(d["rows"]) for d in done.values())),
        batch_size=plan.batch_size, sites=plan.kind.name, per_position=plan.per_position,
        extra={"units": {"count": len(units), "pairs_per_unit": plan.pairs_per_unit or plan.pairs,
                         "world": world, "per_rank": [len(m) for m in dist.assign(costs, world)],
                         "shards": plan.shard_dir, "key": key}})


def run_group(plan):
    """One group of units: a sub-plan run in this process (a pair block x its layers)."""
    return execute(plan, progress=False)


def _plain_sweep(model, store, target, metric, layers, pos, batch_size, progress, layers_path,
                 kind=RESID, per_position=True):
    """The plain batched sweep: (pair, site) rows batched, one fused multi-site
    ``patch_`` launch per layer per forward, the LM head at the metric's position
    only. A site is (layer, position, unit) of the site kind, units being heads for
    head_out (one d_head slice each) and 1 otherwise; with ``per_position=False`` a
    site is (layer, unit) patched at every requested position at once. Returns
    (raw (pairs, layers, positions or 1, units), forwards run)."""
    from tqdm.auto import tqdm

    device = pos.device
    pairs, T = batch_shape(target)
    P = pos.numel()
    width = store[layers[0]].shape[-1]
    U = kind.units(model, width)
    # source cache rows: pair i, position index j, unit u -> row (i * P + j) * U + u
    caches = {l: store[l].reshape(pairs * P * U, width // U) for l in layers}
    columns = range(P) if per_position else [None]
    sites = [(li, j, u) for li in range(len(layers)) for j in columns for u in range(U)]
    S = len(sites)
    raw = torch.empty(pairs, len(layers), len(columns), U, device=device)
    pos_list = pos.tolist()
    n_batches = math.ceil(pairs * S / batch_size)
    state = {}

    def make(li, layer):
        def fn(hidden):
            dst, src = state["plan"].get(li, (None, None))
            if dst is None:
                return None
            rows = split_units(hidden, U)
            written = rows if rows.is_contiguous() else rows.contiguous()
            with unchecked():  # indices built here, in range by construction
                ops.patch_(written, caches[layer], dst, src)
            return None if written is rows else written.flatten(-2)
        return fn

    handles = [kind.register(model, l, make(li, l), layers_path)
               for li, l in enumerate(layers)]
    # the LM head only where the metric reads (the last position): a (rows, T, V) fp32
    # logits tensor per batch would be most of the batch's memory
    head = last_position_head(model, metric)
    if head is not None:
        handles.append(head.register_forward_pre_hook(
            lambda m, args: (args[0][:, -1:],) + tuple(args[1:])))
    try:
        with torch.no_grad():
            for b in tqdm(range(n_batches), disable=not progress, desc="patching sweep",
                          unit="batch"):
                items = range(b * batch_size, min((b + 1) * batch_size, pairs * S))
                pair_ids = [k // S for k in items]
                plan = {}
                for row, k in enumerate(items):
                    li, j, u = sites[k % S]
                    d, s = plan.setdefault(li, ([], []))
                    for jj in ([j] if per_position else range(P)):
                        d.append((row * T + pos_list[jj]) * U + u)
                        s.append((pair_ids[row] * P + jj) * U + u)
                # indices on each patched layer's device (device_map: layers differ)
                state["plan"] = {li: (torch.tensor(d, device=caches[layers[li]].device),
                                      torch.tensor(s, device=caches[layers[li]].device))
                                 for li, (d, s) in plan.items()}
                pair_index = torch.tensor(pair_ids, device=device)
                logits = model_output(model(**select_rows(target, pair_index), use_cache=False))
                values = metric(logits, pair_index).float().to(device)
                li, j, u = (torch.tensor([sites[k % S][x] or 0 for k in items], device=device)
                            for x in range(3))
                raw[pair_index, li, j, u] = values
    finally:
        for h in handles:
            h.remove()
    return raw, n_batches
