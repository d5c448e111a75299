"""Activation caching, batched activation-patching sweeps, attribution patching.

Sites are residual-stream (layer, position) pairs, layers numbered as in
``output_hidden_states`` (0 = embeddings .. L = output of the last block).

A metric is a callable ``metric(logits, pair_index) -> (rows,)`` where
``pair_index`` (rows,) says which prompt pair each batch row belongs to (a
patching batch holds many copies of one pair, each with a different site
patched). Callables of ``logits`` alone are accepted too. See
:func:`logit_diff` and :func:`prob_diff`.
"""
import inspect
import math
import os
from dataclasses import dataclass, field

import torch

from . import ops
from .backend import unchecked
from .distributed import active as dist_active
from .models import (StopForward, eval_mode, model_device, model_name, register_site_hook,
                     resolve_layers)
from .reuse import resolve_reuse, reuse_sweep


# --------------------------------------------------------------------------- inputs, metrics

def as_inputs(inputs, device, name="inputs"):
    """input_ids tensor, or a dict / BatchEncoding of model inputs, on ``device``."""
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    elif hasattr(inputs, "items"):
        inputs = dict(inputs.items())
    else:
        raise TypeError(f"{name} must be an input_ids tensor or a dict of model inputs, got "
                        f"{type(inputs).__name__}")
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and (ids.is_floating_point() or ids.is_complex()
                                          or ids.dtype == torch.bool):
        raise TypeError(f"{name}: input_ids must be integer token ids, got {ids.dtype} "
                        f"(pass float embeddings as inputs_embeds)")
    main = ids if ids is not None else inputs.get("inputs_embeds")
    if isinstance(main, torch.Tensor):
        if main.dim() < 2:
            raise ValueError(f"{name} must be (batch, tokens), got shape {tuple(main.shape)}; "
                             f"add a batch dimension (ids[None]) for one prompt")
        if main.shape[0] == 0 or main.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(main.shape[:2])} (batch, tokens); "
                             f"give at least one prompt of at least one token")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def positive_int(name, value, allow_none=True):
    """A count option (batch size, pairs per unit): None (default) or an int >= 1."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return value


def _aligned_pairs(clean, corrupt, device):
    clean, corrupt = as_inputs(clean, device, "clean"), as_inputs(corrupt, device, "corrupt")
    if _batch_shape(clean) != _batch_shape(corrupt):
        raise ValueError(f"clean and corrupt must have the same shape (aligned pairs), got "
                         f"{_batch_shape(clean)} and {_batch_shape(corrupt)}")
    return clean, corrupt


def _batch_shape(inputs):
    t = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if t is None:
        raise ValueError("inputs need input_ids or inputs_embeds")
    return tuple(t.shape[:2])


def select_rows(inputs, index):
    return {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v)
            for k, v in inputs.items()}


def model_output(out):
    """Logits when the model has an LM head, else its last hidden state."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0] if isinstance(out, (tuple, list)) else out


def as_metric(metric):
    """``metric(logits, pair_index)``, checked on every call to return one
    value per row of ``logits``."""
    if not callable(metric):
        raise TypeError("metric must be callable: metric(logits, pair_index) or metric(logits)")
    raw = _two_argument(metric)

    def checked(logits, pair_index):
        value = raw(logits, pair_index)
        rows = logits.shape[0]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (rows,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"metric must return one value per row of logits, shape ({rows},); "
                             f"got {shape}. Reduce over positions/vocabulary inside the metric, "
                             f"not over the batch.")
        if not value.is_floating_point():
            raise TypeError(f"metric must return floating values (e.g. a logit or probability "
                            f"difference), got {value.dtype}: an integer or boolean metric "
                            f"(argmax correctness) has no gradient and no graded effect")
        return value
    checked.num_pairs = getattr(metric, "num_pairs", None)
    checked.positions = getattr(metric, "positions", None)  # logits positions it reads
    return checked


def check_metric_pairs(metric, pairs):
    """A metric built for a number of pairs (logit_diff / prob_diff with one
    answer per pair) must match the pairs it is given."""
    n = getattr(metric, "num_pairs", None)
    if n is not None and n != pairs:
        raise ValueError(f"metric was built with {n} answers (one per pair) but there are "
                         f"{pairs} pairs")


def check_finite_metric(values, run):
    """The metric on a whole run (clean, corrupt, patched) must be finite."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        where = torch.nonzero(bad.reshape(values.shape[0], -1).any(-1)).flatten().tolist()
        raise ValueError(f"metric is NaN or Inf on the {run} run of {len(where)} of "
                         f"{values.shape[0]} pairs (first: pair {where[0]}); effects would be "
                         f"NaN. Use a metric that stays finite (e.g. a logit difference rather "
                         f"than a log of a probability that can reach 0).")


def check_denominator(clean_metric, corrupt_metric):
    """m(clean) - m(corrupt), refusing 0 (effects would be 0/0) and non-finite values."""
    check_finite_metric(clean_metric, "clean")
    check_finite_metric(corrupt_metric, "corrupt")
    denom = (clean_metric - corrupt_metric).mean()
    scale = float(clean_metric.abs().mean() + corrupt_metric.abs().mean()) + 1.0
    if not bool(torch.isfinite(denom)) or abs(float(denom)) <= 1e-7 * scale:
        raise ValueError(
            f"mean metric difference m(clean) - m(corrupt) is {float(denom):.3g}: clean and "
            f"corrupt do not differ on this metric (identical inputs?), so normalised effects "
            f"would be 0/0. Check the pairs and the metric's answer tokens.")
    return denom


def _two_argument(metric):
    try:
        params = [p for p in inspect.signature(metric).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                         p.POSITIONAL_OR_KEYWORD)]
        takes_index = len(params) >= 2
    except (TypeError, ValueError):
        takes_index = True
    if takes_index:
        return metric
    return lambda logits, pair_index: metric(logits)


def _answer_logits(logits, pair_index, position, tokens):
    """logits[row, position, token] with per-pair (or shared) tokens/positions."""
    B = logits.shape[0]
    rows = torch.arange(B, device=logits.device)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= logits.shape[-1]):
        raise ValueError(f"answer/wrong token ids must be in [0, {logits.shape[-1]}) (the "
                         f"vocabulary of these logits), got min {int(tokens.min())} max "
                         f"{int(tokens.max())}")
    tok = tokens.to(logits.device)
    tok = tok.expand(B) if tok.dim() == 0 else tok[pair_index]
    T = logits.shape[1]
    if isinstance(position, int):
        if not -T <= position < T:
            raise ValueError(f"position {position} is outside these logits' {T} positions "
                             f"(valid: -{T} .. {T - 1})")
    else:
        if position.numel() and (int(position.min()) < -T or int(position.max()) >= T):
            raise ValueError(f"position must be in -{T} .. {T - 1} (these logits' positions), "
                             f"got min {int(position.min())} max {int(position.max())}")
        position = position.to(logits.device)[pair_index]
    return logits[rows, position, tok]


def logit_diff(answer, wrong, position=-1):
    """metric: logit(answer) - logit(wrong) at ``position`` (int, or one per pair).

    ``answer`` / ``wrong``: (pairs,) token ids (or ints shared by all pairs).
    """
    answer, wrong, pairs = _pair_tensors(answer, wrong)
    position = position if isinstance(position, int) else torch.as_tensor(position)

    def metric(logits, pair_index):
        return (_answer_logits(logits, pair_index, position, answer)
                - _answer_logits(logits, pair_index, position, wrong))
    metric.num_pairs = pairs
    metric.positions = (position,) if isinstance(position, int) else None
    return metric


def prob_diff(answer, wrong, position=-1):
    """metric: p(answer) - p(wrong) at ``position`` (softmax over the vocabulary)."""
    answer, wrong, pairs = _pair_tensors(answer, wrong)
    position = position if isinstance(position, int) else torch.as_tensor(position)

    def metric(logits, pair_index):
        probs = logits.float().softmax(-1)
        return (_answer_logits(probs, pair_index, position, answer)
                - _answer_logits(probs, pair_index, position, wrong))
    metric.num_pairs = pairs
    metric.positions = (position,) if isinstance(position, int) else None
    return metric


def _pair_tensors(answer, wrong):
    answer, wrong = torch.as_tensor(answer), torch.as_tensor(wrong)
    for name, t in (("answer", answer), ("wrong", wrong)):
        if t.is_floating_point() or t.dim() > 1:
            raise ValueError(f"{name} must be an int or a 1-D integer tensor of token ids "
                             f"(one per pair), got {t.dtype} of shape {tuple(t.shape)}")
    if answer.dim() == 1 and wrong.dim() == 1 and answer.numel() != wrong.numel():
        raise ValueError(f"answer has {answer.numel()} entries and wrong has {wrong.numel()}; "
                         f"give one of each per pair")
    pairs = next((t.numel() for t in (answer, wrong) if t.dim() == 1), None)
    return answer.long(), wrong.long(), pairs


def resolve_positions(positions, T, device):
    """Column indices (P,) of the requested positions; None = all, negatives from the end."""
    if positions is None:
        return torch.arange(T, device=device)
    pos = torch.as_tensor(positions if not isinstance(positions, int) else [positions])
    if pos.dim() != 1 or pos.is_floating_point():
        raise ValueError("positions must be None, an int or a 1-D list of ints")
    pos = torch.where(pos < 0, pos + T, pos)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= T):
        raise ValueError(f"positions out of range for sequence length {T}")
    return pos.long().to(device)


# --------------------------------------------------------------------------- caching

@dataclass
class ActivationCache:
    """Residual activations: ``acts`` (batch, len(layers), len(positions), D)."""
    acts: torch.Tensor
    layers: list
    positions: torch.Tensor
    output: torch.Tensor = None  # logits (or last hidden state) when the forward completed

    def __getitem__(self, layer):
        return self.acts[:, self.layers.index(layer)]


def _capture(model, inputs, layers, pos, layers_path, stop_early):
    store = {}
    last = max(layers)

    def make(layer):
        def fn(hidden):
            store[layer] = hidden.detach().index_select(1, pos.to(hidden.device))
            if stop_early and layer == last:
                raise StopForward
        return fn

    handles = [register_site_hook(model, l, make(l), layers_path) for l in layers]
    output = None
    try:
        with torch.no_grad():
            output = model_output(model(**inputs))
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return store, output


def cache_activations(model, inputs, layers=None, positions=None, *, layers_path=None,
                      stop_early=True):
    """Residual-stream activations at the requested sites, from one forward pass.

    Only the requested positions are kept, and with ``stop_early`` the forward
    stops after the last requested layer (no later blocks, no LM head).
    Returns an :class:`ActivationCache`; ``cache[layer]`` is (batch, P, D).
    """
    layers = resolve_layers(model, layers, layers_path)
    inputs = as_inputs(inputs, model_device(model))
    B, T = _batch_shape(inputs)
    pos = resolve_positions(positions, T, model_device(model))
    with eval_mode(model, "cache_activations"):
        store, output = _capture(model, inputs, layers, pos, layers_path, stop_early)
    device = model_device(model)  # layers may sit on several devices (device_map)
    return ActivationCache(torch.stack([store[l].to(device) for l in layers], 1), layers, pos,
                           output)


# --------------------------------------------------------------------------- site maps


class SiteMap:
    """Shared views of a (layers, positions) map of per-site values."""

    def _values(self):
        raise NotImplementedError

    def top_sites(self, k=10):
        """The k sites with the largest values: [(layer, position, value), ...]
        (a NaN value, if any, ranks last)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int (how many sites), got {k!r}")
        values = self._values().detach().float().cpu()
        flat = values.flatten()
        key = torch.where(torch.isnan(flat), torch.full_like(flat, -float("inf")), flat)
        order = torch.argsort(key, descending=True, stable=True)
        order = torch.cat([order[~torch.isnan(flat[order])], order[torch.isnan(flat[order])]])[:k]
        P = values.shape[1]
        pos = self.positions.tolist()
        return [(self.layers[i // P], pos[i % P], float(flat[i])) for i in order.tolist()]

    def plot(self, path=None, title=None, ax=None):
        """Heatmap of the map (layers x positions); saved to ``path`` if given."""
        import matplotlib
        if path is not None and ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        values = self._values().detach().float().cpu().numpy()
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(1.2 + 0.45 * values.shape[1],
                                            1.2 + 0.35 * values.shape[0]))
        lim = float(abs(values).max()) or 1.0
        im = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(values.shape[1]), self.positions.tolist())
        ax.set_yticks(range(values.shape[0]), self.layers)
        ax.set(xlabel="position", ylabel="layer", title=title or type(self).__name__)
        ax.figure.colorbar(im, ax=ax)
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=120)
                plt.close(fig)
        return ax


# --------------------------------------------------------------------------- patching sweep

@dataclass
class PatchingResult(SiteMap):
    """effects[l, p]: normalised patching effect per site (docs/protocol.md ratio of means);
    raw[i, l, p]: the metric with that site patched, per pair. ``top_sites(k)``
    and ``plot(path)`` show the map."""
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

    def _values(self):
        return self.effects


def _auto_batch_size(model, T, memory_budget_mb):
    cfg = getattr(model, "config", None)
    D = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    V = getattr(cfg, "vocab_size", 0) or 0
    inter = getattr(cfg, "intermediate_size", None) or 4 * D
    elem = next(model.parameters()).element_size()
    # live activations per sequence at inference: a few D-wide and one MLP-wide
    # tensor per token, plus fp32 logits
    per_row = T * ((6 * D + 2 * inter) * elem + 4 * V)
    return max(1, int(memory_budget_mb * 2**20 // max(per_row, 1)))


def patching_sweep(model, clean, corrupt, metric, layers=None, positions=None, *,
                   noising=False, reuse="auto", batch_size=None, memory_budget_mb=1024,
                   progress=True, layers_path=None, distributed=None, shard_dir=None,
                   pairs_per_unit=None):
    """Activation patching over every requested site and prompt pair.

    Denoising (default): run ``corrupt`` with h_s <- h_s(clean), one site at a
    time; noising: run ``clean`` with h_s <- h_s(corrupt).

    Args:
        clean, corrupt: (pairs, T) input_ids, or dicts of inputs of equal shape.
        metric: ``metric(logits, pair_index) -> (rows,)`` (or of logits only).
        layers: site layers (default all, 0..L); positions: columns (default all).
        reuse: 'auto' (default: 'full' for causal LMs, else 'none'), 'full'
            (skip identical sites, reuse the base run's KV-cache prefix, skip
            the blocks before the site, LM head only at the metric's last
            position), 'prefix' (the same without skipping blocks) or 'none'
            (the plain batched sweep: many (pair, site) rows per forward, one
            fused multi-site ``patch_`` launch per layer; needed for
            non-causal models). See :mod:`steerops.reuse`.
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

    Returns a :class:`PatchingResult`: effects normalised as in docs/protocol.md,
    g_s = E[m(patched) - m(corrupt)] / E[m(clean) - m(corrupt)] (denoising) or
    E[m(clean) - m(patched)] / E[m(clean) - m(corrupt)] (noising);
    ``result.extra["reuse"]`` says what was reused and the token-layers run.
    """
    positive_int("batch_size", batch_size)
    positive_int("pairs_per_unit", pairs_per_unit)
    if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) \
            or not memory_budget_mb > 0 or not math.isfinite(memory_budget_mb):
        raise ValueError(f"memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
    with eval_mode(model, "patching_sweep"):
        return _patching_sweep(model, clean, corrupt, metric, layers, positions,
                               noising=noising, reuse=reuse, batch_size=batch_size,
                               memory_budget_mb=memory_budget_mb, progress=progress,
                               layers_path=layers_path, distributed=distributed,
                               shard_dir=shard_dir, pairs_per_unit=pairs_per_unit)


def _patching_sweep(model, clean, corrupt, metric, layers, positions, *, noising, reuse,
                    batch_size, memory_budget_mb, progress, layers_path, distributed,
                    shard_dir, pairs_per_unit):
    device = model_device(model)
    layers = resolve_layers(model, layers, layers_path)
    metric = as_metric(metric)
    reuse = resolve_reuse(model, reuse)
    clean, corrupt = _aligned_pairs(clean, corrupt, device)
    pairs, T = _batch_shape(clean)
    check_metric_pairs(metric, pairs)
    pos = resolve_positions(positions, T, device)
    P = pos.numel()
    if dist_active(distributed) or shard_dir is not None:
        return _sweep_in_units(
            model, clean, corrupt, metric, layers, pos, pairs_per_unit or pairs, shard_dir,
            progress, distributed, dict(noising=noising, reuse=reuse, batch_size=batch_size,
                                        memory_budget_mb=memory_budget_mb,
                                        layers_path=layers_path))
    source, target = (corrupt, clean) if noising else (clean, corrupt)
    every = torch.arange(pairs, device=device)
    store, source_out = _capture(model, source, layers, pos, layers_path, stop_early=False)
    source_metric = metric(source_out, every).float()
    if batch_size is None:
        batch_size = _auto_batch_size(model, T, memory_budget_mb)
    if reuse == "none":
        with torch.no_grad():
            target_metric = metric(model_output(model(**target)), every).float()
        batch_size = max(1, min(batch_size, pairs * len(layers) * P))
        raw, n_batches = _plain_sweep(model, store, target, metric, layers, pos, batch_size,
                                      progress, layers_path)
        report = {"mode": "none", "forwards": 1 + n_batches,
                  "rows": pairs + pairs * len(layers) * P}
    else:
        raw, target_metric, report = reuse_sweep(
            model, store, target, metric, layers, pos, mode=reuse, batch_size=batch_size,
            model_output=model_output, layers_path=layers_path, progress=progress)
    clean_metric, corrupt_metric = ((target_metric, source_metric) if noising
                                    else (source_metric, target_metric))
    effects = _normalised(raw, clean_metric, corrupt_metric, noising, layers, pos)
    return PatchingResult(effects, raw, clean_metric, corrupt_metric, layers, pos, noising,
                          forwards=1 + report["forwards"], rows=pairs + report["rows"],
                          batch_size=batch_size, extra={"reuse": report})


def _rows_metric(metric, rows):
    """``metric`` seen from a block of pairs: pair i of the block is pair rows[i]."""
    def sub(logits, pair_index):
        return metric(logits, rows.to(pair_index.device)[pair_index])
    sub.positions = getattr(metric, "positions", None)
    return sub


def check_finite_sites(raw, layers, pos, what="metric"):
    """``raw`` (pairs, layers, positions) per-site values must be finite: a NaN at
    one site would make its effect NaN (and rank it anywhere)."""
    bad = ~torch.isfinite(raw)
    if bool(bad.any()):
        i, li, j = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(
            f"{what} is NaN or Inf at {int(bad.sum())} of {raw.numel()} patched (pair, site) "
            f"rows, first at pair {i}, layer {layers[li]}, position {int(pos[j])}: effects "
            f"would be NaN. Use a metric that stays finite under patching (e.g. a logit "
            f"difference rather than a log-probability margin).")


def _normalised(raw, clean_metric, corrupt_metric, noising, layers, pos):
    denom = check_denominator(clean_metric, corrupt_metric)
    check_finite_sites(raw, layers, pos)
    if noising:
        return (clean_metric.mean() - raw.mean(0)) / denom
    return (raw.mean(0) - corrupt_metric.mean()) / denom


def _sweep_in_units(model, clean, corrupt, metric, layers, pos, block, shard_dir, progress,
                    distributed, options):
    """patching_sweep over units (a block of pairs x one layer), split over ranks and
    gathered, or run here with shards on disk (steerops.distributed)."""
    from tqdm.auto import tqdm

    from . import distributed as D
    pairs, _ = _batch_shape(clean)
    L_max = max(layers)
    blocks = [(a, min(a + block, pairs)) for a in range(0, pairs, block)]
    units = [(a, b, l) for (a, b) in blocks for l in layers]
    # cost of a unit ~ pairs x (blocks after the layer + the two base runs)
    costs = [(b - a) * (L_max - l + 2) for a, b, l in units]
    rank, world = D.rank_world() if D.active(distributed) else (0, 1)
    mine = D.assign(costs, world)[rank] if world > 1 else list(range(len(units)))
    key = None
    if shard_dir is not None:
        ids = [x["input_ids"] if isinstance(x, dict) and "input_ids" in x else x
               for x in (clean, corrupt)]
        key = D.fingerprint(ids[0], ids[1], layers, pos, block, model_name(model),
                            {k: v for k, v in options.items() if k != "layers_path"},
                            *D.weights_sample(model))
    done, todo = {}, {}
    for u in mine:
        path = None if key is None else os.path.join(shard_dir,
                                                      f"sweep-{key}-unit{u}.safetensors")
        shard = D.load_shard(path) if path is not None and os.path.exists(path) else None
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
              for g in ([block] if options["reuse"] != "none" else [[x] for x in block])]
    bar = tqdm(total=sum(len(g) for g in groups), disable=not (progress and D.is_main()),
               desc="patching units")
    for group in groups:
        a, b, _ = units[group[0][0]]
        rows = torch.arange(a, b, device=model_device(model))
        r = patching_sweep(model, select_rows(clean, rows), select_rows(corrupt, rows),
                           _rows_metric(metric, rows), [units[u][2] for u, _ in group], pos,
                           progress=False, distributed=False, **options)
        for k, (u, path) in enumerate(group):
            # the group's forwards and rows are counted once, on its first unit
            done[u] = {"raw": r.raw[:, k].float().cpu(), "clean": r.clean_metric.float().cpu(),
                       "corrupt": r.corrupt_metric.float().cpu(),
                       "forwards": torch.tensor(r.forwards if k == 0 else 0),
                       "rows": torch.tensor(r.rows if k == 0 else 0)}
            if path is not None:
                D.save_shard(path, done[u], {"unit": units[u]})
        bar.update(len(group))
    bar.close()
    if world > 1:
        for part in D.gather(done):
            done.update(part)
    device = model_device(model)
    raw = torch.empty(pairs, len(layers), pos.numel())
    clean_metric, corrupt_metric = torch.empty(pairs), torch.empty(pairs)
    for u, (a, b, layer) in enumerate(units):
        raw[a:b, layers.index(layer)] = done[u]["raw"]
        clean_metric[a:b], corrupt_metric[a:b] = done[u]["clean"], done[u]["corrupt"]
    raw, clean_metric, corrupt_metric = (x.to(device) for x in (raw, clean_metric,
                                                                 corrupt_metric))
    noising = options["noising"]
    effects = _normalised(raw, clean_metric, corrupt_metric, noising, layers, pos)
    return PatchingResult(
        effects, raw, clean_metric, corrupt_metric, layers, pos, noising,
        forwards=int(sum(int(d["forwards"]) for d in done.values())),
        rows=int(sum(int(d["rows"]) for d in done.values())),
        batch_size=options["batch_size"] or 0,
        extra={"units": {"count": len(units), "pairs_per_unit": block, "world": world,
                         "per_rank": [len(m) for m in D.assign(costs, world)],
                         "shards": shard_dir, "key": key}})


def _plain_sweep(model, store, target, metric, layers, pos, batch_size, progress, layers_path):
    """The plain batched sweep: (pair, site) rows batched, one fused multi-site
    ``patch_`` launch per layer per forward. Returns (raw, forwards run)."""
    from tqdm.auto import tqdm

    device = pos.device
    pairs, T = _batch_shape(target)
    P = pos.numel()
    # source cache rows: pair i, position index j -> row i * P + j
    caches = {l: store[l].reshape(pairs * P, -1) for l in layers}
    sites = [(li, j) for li in range(len(layers)) for j in range(P)]
    S = len(sites)
    raw = torch.empty(pairs, len(layers), P, device=device)
    pos_list = pos.tolist()
    n_batches = math.ceil(pairs * S / batch_size)
    state = {}

    def make(li, layer):
        def fn(hidden):
            dst, src = state["plan"].get(li, (None, None))
            if dst is not None:
                with unchecked():  # indices built here, in range by construction
                    ops.patch_(hidden, caches[layer], dst, src)
        return fn

    handles = [register_site_hook(model, l, make(li, l), layers_path)
               for li, l in enumerate(layers)]
    try:
        with torch.no_grad():
            for b in tqdm(range(n_batches), disable=not progress, desc="patching sweep",
                          unit="batch"):
                items = range(b * batch_size, min((b + 1) * batch_size, pairs * S))
                pair_ids = [k // S for k in items]
                plan = {}
                for row, k in enumerate(items):
                    li, j = sites[k % S]
                    d, s = plan.setdefault(li, ([], []))
                    d.append(row * T + pos_list[j])
                    s.append(pair_ids[row] * P + j)
                # indices on each patched layer's device (device_map: layers differ)
                state["plan"] = {li: (torch.tensor(d, device=caches[layers[li]].device),
                                      torch.tensor(s, device=caches[layers[li]].device))
                                 for li, (d, s) in plan.items()}
                pair_index = torch.tensor(pair_ids, device=device)
                logits = model_output(model(**select_rows(target, pair_index)))
                values = metric(logits, pair_index).float().to(device)
                site_ids = torch.tensor([k % S for k in items], device=device)
                raw[pair_index, site_ids // P, site_ids % P] = values
    finally:
        for h in handles:
            h.remove()
    return raw, n_batches


# --------------------------------------------------------------------------- attribution patching

@dataclass
class AttributionResult(SiteMap):
    """AtP: scores[l, p] ~ E[(h_clean - h_corrupt) . dm/dh] / E[m(clean) - m(corrupt)]
    (comparable to patching effects); raw[i, l, p] per pair, unnormalised.
    ``top_sites(k)`` and ``plot(path)`` show the map."""
    scores: torch.Tensor
    raw: torch.Tensor
    clean_metric: torch.Tensor
    corrupt_metric: torch.Tensor
    layers: list
    positions: torch.Tensor

    def _values(self):
        return self.scores


def _metric_gradients(model, inputs, metric, index, layers, pos, layers_path):
    """One forward with gradients and one backward: (metric values, [h_l at pos],
    [dm/dh_l at pos]) per requested layer (the gradient of the summed metric, so
    each row's gradient is its own metric's)."""
    captured = {}

    def make(layer):
        def fn(hidden):
            if layer == 0:  # gradients must reach every site even with frozen weights;
                # a clone of the new leaf (not the leaf itself) keeps hook-based tools
                # (FlopCounterMode's module tracker) working with autograd.grad
                hidden = hidden.detach().requires_grad_(True).clone()
            captured[layer] = hidden
            return hidden if layer == 0 else None
        return fn

    hook_layers = sorted(set(layers) | {0})
    handles = [register_site_hook(model, l, make(l), layers_path) for l in hook_layers]
    try:
        with torch.enable_grad():
            m = metric(model_output(model(**inputs)), index).float()
            grads = torch.autograd.grad(m.sum(), [captured[l] for l in layers],
                                        allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    acts = [captured[l].detach().index_select(1, pos.to(captured[l].device)) for l in layers]
    grads = [torch.zeros_like(h) if g is None else g.index_select(1, pos.to(g.device))
             for h, g in zip(acts, grads)]
    return m.detach(), acts, grads


@dataclass
class GradientCache:
    """Residual activations and the metric's gradient at them: ``acts`` and
    ``grads`` (batch, len(layers), len(positions), D); ``metric`` (batch,)."""
    acts: torch.Tensor
    grads: torch.Tensor
    metric: torch.Tensor
    layers: list
    positions: torch.Tensor


def cache_gradients(model, inputs, metric, layers=None, positions=None, *, layers_path=None):
    """Activations and dm/dh at the requested residual sites from one forward and
    one backward (to the activations only; the model's weights get no gradient).
    ``metric(logits, pair_index)`` gives one value per row of ``inputs``."""
    device = model_device(model)
    layers = resolve_layers(model, layers, layers_path)
    metric = as_metric(metric)
    inputs = as_inputs(inputs, device)
    B, T = _batch_shape(inputs)
    check_metric_pairs(metric, B)
    pos = resolve_positions(positions, T, device)
    with eval_mode(model, "cache_gradients"):
        m, acts, grads = _metric_gradients(model, inputs, metric,
                                           torch.arange(B, device=device), layers, pos,
                                           layers_path)
    return GradientCache(torch.stack([a.to(device) for a in acts], 1),
                         torch.stack([g.to(device) for g in grads], 1), m, layers, pos)


def attribution_patching(model, clean, corrupt, metric, layers=None, positions=None, *,
                         batch_size=None, layers_path=None, distributed=None):
    """Attribution patching (AtP) for every requested residual site.

    Two forwards (clean cache; corrupt with gradients) and one backward per
    micro-batch of pairs: a_s = (h_s(clean) - h_s(corrupt)) . dm/dh_s evaluated
    on the corrupt run. Gradients flow to the activations even when the
    model's parameters are frozen. ``distributed`` as in :func:`patching_sweep`:
    the micro-batches are split over the ranks and gathered (same micro-batches,
    so the same numbers as one process).
    """
    positive_int("batch_size", batch_size)
    with eval_mode(model, "attribution_patching"):
        return _attribution_patching(model, clean, corrupt, metric, layers, positions,
                                     batch_size, layers_path, distributed)


def _attribution_patching(model, clean, corrupt, metric, layers, positions, batch_size,
                          layers_path, distributed):
    from . import distributed as D
    device = model_device(model)
    layers = resolve_layers(model, layers, layers_path)
    metric = as_metric(metric)
    clean, corrupt = _aligned_pairs(clean, corrupt, device)
    pairs, T = _batch_shape(clean)
    check_metric_pairs(metric, pairs)
    pos = resolve_positions(positions, T, device)
    batch_size = pairs if batch_size is None else batch_size
    blocks = [(a, min(a + batch_size, pairs)) for a in range(0, pairs, batch_size)]
    rank, world = D.rank_world() if D.active(distributed) else (0, 1)
    mine = D.assign([b - a for a, b in blocks], world)[rank]
    done = {}
    for u in mine:
        index = torch.arange(*blocks[u], device=device)
        c_in, x_in = select_rows(clean, index), select_rows(corrupt, index)
        store, out = _capture(model, c_in, layers, pos, layers_path, stop_early=False)
        m_clean = metric(out, index).float()
        m, h_corrupt, grads = _metric_gradients(model, x_in, metric, index, layers, pos,
                                                layers_path)
        raw = torch.stack([((store[l] - h).float() * g.float()).sum(-1).to(device)
                           for l, h, g in zip(layers, h_corrupt, grads)], 1)
        done[u] = (raw, m_clean, m.detach())
    if world > 1:
        merged = {}
        for part in D.gather({u: tuple(x.cpu() for x in v) for u, v in done.items()}):
            merged.update(part)
        done = {u: tuple(x.to(device) for x in v) for u, v in merged.items()}
    raw, m_clean, m_corrupt = (torch.cat([done[u][i] for u in range(len(blocks))])
                               for i in range(3))
    scores = raw.mean(0) / check_denominator(m_clean, m_corrupt)
    check_finite_sites(raw, layers, pos, "the metric's gradient times the activation change")
    return AttributionResult(scores, raw, m_clean, m_corrupt, layers, pos)
