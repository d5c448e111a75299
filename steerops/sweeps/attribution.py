"""Attribution patching (AtP): every site's linear estimate of its patching effect
from two forwards and one backward per micro-batch of pairs."""
from dataclasses import dataclass, field

import torch

from ..model.blocks import eval_mode, model_device
from ..model.caching import capture, metric_gradients
from ..model.inputs import aligned_pairs, batch_shape, positive_int, resolve_positions, select_rows
from ..model.metrics import as_metric, check_denominator, check_finite_sites, check_metric_pairs
from ..model.pairs import prompt_pairs
from ..model.sites import resolve_site_layers, site_kind, split_units
from .sitemap import SiteMap


@dataclass
class AttributionResult(SiteMap):
    """AtP: scores[l, p] ~ E[(h_clean - h_corrupt) . dm/dh] / E[m(clean) - m(corrupt)]
    (comparable to patching effects); raw[i, l, p] per pair, unnormalised. The axes
    follow the site kind (``axes()``): (block, head, position) for 'head_out',
    (block, position, neuron) for 'neuron'. ``top_sites(k)`` and ``plot(path)`` show
    the map."""
    scores: torch.Tensor
    raw: torch.Tensor
    clean_metric: torch.Tensor
    corrupt_metric: torch.Tensor
    layers: list
    positions: torch.Tensor
    tokens: list = field(default=None, repr=False)          # clean token strings per pair
    corrupt_tokens: list = field(default=None, repr=False)  # (pairs, T), with a tokenizer
    sites: str = "resid"

    def _values(self):
        return self.scores


def attribution_patching(model, clean, corrupt=None, metric=None, layers=None, positions=None, *,
                         batch_size=None, layers_path=None, distributed=None, tokenizer=None,
                         sites="resid"):
    """Attribution patching (AtP) for every requested site.

    ``sites``: the kind (steerops.model.sites): 'resid' (default; layers 0..L),
    'resid_mid', 'attn_out', 'mlp_out' (blocks 0..L-1; scores (L, T)), 'head_out'
    (scores (L, H, T)) or 'neuron' (scores (L, T, d_mlp)).

    Two forwards (clean cache; corrupt with gradients) and one backward per
    micro-batch of pairs: a_s = (h_s(clean) - h_s(corrupt)) . dm/dh_s evaluated
    on the corrupt run. Gradients flow to the activations even when the
    model's parameters are frozen. ``distributed`` as in :func:`patching_sweep`:
    the micro-batches are split over the ranks and gathered (same micro-batches,
    so the same numbers as one process). Text prompts and answers with
    ``tokenizer=``, or a :class:`~steerops.model.pairs.PromptPairs`, as in
    :func:`patching_sweep`; ``result.tokens`` labels positions.
    """
    positive_int("batch_size", batch_size)
    kind = site_kind(sites)
    pairs = prompt_pairs(model, tokenizer, clean, corrupt, metric, model_device(model))
    clean, corrupt, metric, tokens = pairs.clean, pairs.corrupt, pairs.metric, pairs.tokens
    with eval_mode(model, "attribution_patching"):
        result = _attribution_patching(model, clean, corrupt, metric, layers, positions,
                                       batch_size, layers_path, distributed, kind)
    if tokens is not None:
        result.tokens, result.corrupt_tokens = tokens
    return result


def _attribution_patching(model, clean, corrupt, metric, layers, positions, batch_size,
                          layers_path, distributed, kind):
    from . import distributed as dist
    device = model_device(model)
    layers = resolve_site_layers(model, kind, layers, layers_path)
    metric = as_metric(metric)
    clean, corrupt = aligned_pairs(clean, corrupt, device)
    pairs, T = batch_shape(clean)
    check_metric_pairs(metric, pairs)
    pos = resolve_positions(positions, T, device)
    batch_size = pairs if batch_size is None else batch_size
    blocks = [(a, min(a + batch_size, pairs)) for a in range(0, pairs, batch_size)]
    rank, world = dist.rank_world() if dist.active(distributed) else (0, 1)
    mine = dist.assign([b - a for a, b in blocks], world)[rank]
    done = {}
    for u in mine:
        index = torch.arange(*blocks[u], device=device)
        c_in, x_in = select_rows(clean, index), select_rows(corrupt, index)
        store, out = capture(model, c_in, layers, pos, layers_path, False, kind)
        m_clean = metric(out, index).float()
        m, h_corrupt, grads = metric_gradients(model, x_in, metric, index, layers, pos,
                                                layers_path, kind)
        units = kind.units(model, h_corrupt[0].shape[-1])
        # (pairs, P, units): each unit's slice of the activation dotted with its gradient
        raw = torch.stack([split_units((store[l] - h).float() * g.float(), units).sum(-1)
                           .to(device) for l, h, g in zip(layers, h_corrupt, grads)], 1)
        raw = kind.arrange(raw)
        done[u] = (raw, m_clean, m.detach())
    if world > 1:
        merged = {}
        for part in dist.gather({u: tuple(x.cpu() for x in v) for u, v in done.items()}):
            merged.update(part)
        done = {u: tuple(x.to(device) for x in v) for u, v in merged.items()}
    raw, m_clean, m_corrupt = (torch.cat([done[u][i] for u in range(len(blocks))])
                               for i in range(3))
    scores = raw.mean(0) / check_denominator(m_clean, m_corrupt)
    check_finite_sites(raw, layers, pos, "the metric's gradient times the activation change")
    return AttributionResult(scores, raw, m_clean, m_corrupt, layers, pos, sites=kind.name)
