"""Activation and gradient caching at the sites of any kind (steerops.model.sites): one
forward; one forward and one backward."""
from dataclasses import dataclass

import torch

from .blocks import StopForward, eval_mode, model_device, register_site_hook
from .inputs import as_inputs, batch_shape, model_output, resolve_positions
from .metrics import as_metric, check_metric_pairs
from .sites import RESID, resolve_site_layers, site_kind


@dataclass
class ActivationCache:
    """Activations: ``acts`` (batch, len(layers), len(positions), W), W the site's width
    (D for the residual stream, attn_out, mlp_out; H x d_head for head_out, split as
    ``cache.heads(layer)``; d_mlp for neuron). ``sites`` names the kind, ``layers`` are
    its layers (blocks for components)."""
    acts: torch.Tensor
    layers: list
    positions: torch.Tensor
    output: torch.Tensor = None  # logits (or last hidden state) when the forward completed
    tokens: list = None  # token strings (batch, T), when made with a tokenizer
    sites: str = "resid"
    units: int = 1  # sites per position: heads for head_out

    def heads(self, layer):
        """(batch, P, H, d_head) at ``layer`` of a head_out cache."""
        if self.sites != "head_out":
            raise ValueError(f"heads(): this cache holds sites={self.sites!r}, not 'head_out'")
        a = self[layer]
        return a.unflatten(-1, (self.units, a.shape[-1] // self.units))

    def __getitem__(self, layer):
        return self.acts[:, self.layers.index(layer)]


def capture(model, inputs, layers, pos, layers_path, stop_early, kind=RESID):
    store = {}
    last = max(layers)

    def make(layer):
        def fn(hidden):
            store[layer] = hidden.detach().index_select(1, pos.to(hidden.device))
            if stop_early and layer == last:
                raise StopForward
        return fn

    handles = [kind.register(model, l, make(l), layers_path) for l in layers]
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


def _refuse_negative_on_right_padding(inputs, positions):
    """A negative position counts from the batch's end, which on a right-padded batch is
    padding for the shorter prompts: refused, with what to do instead."""
    from .text import right_pad_last
    if positions is None or right_pad_last(inputs) is None:
        return
    values = [positions] if isinstance(positions, int) else list(
        positions.tolist() if hasattr(positions, "tolist") else positions)
    if any(int(p) < 0 for p in values):
        raise ValueError(f"positions {values}: negative positions on a right-padded batch would "
                         f"read padding for the shorter prompts; pad on the left "
                         f"(tokenizer.padding_side = 'left') or give positions from the start")


def cache_activations(model, inputs, layers=None, positions=None, *, layers_path=None,
                      stop_early=True, tokenizer=None, sites="resid"):
    """Activations at the requested sites, from one forward pass.

    ``sites``: the kind (steerops.model.sites: 'resid' (default), 'resid_mid', 'attn_out',
    'mlp_out', 'head_out', 'neuron'); ``layers`` are its layers (0..L for the
    residual stream, blocks 0..L-1 for components). Only the requested positions
    are kept, and with ``stop_early`` the forward stops after the last requested
    layer (no later blocks, no LM head).
    Returns an :class:`ActivationCache`; ``cache[layer]`` is (batch, P, W).
    ``inputs`` may be text (a string or list of strings) with ``tokenizer``
    (padded on its side); then ``cache.tokens`` holds each position's token string.
    """
    from .text import prompt_inputs
    kind = site_kind(sites)
    layers = resolve_site_layers(model, kind, layers, layers_path)
    inputs = prompt_inputs(model, tokenizer, inputs, model_device(model))
    tokens = getattr(inputs, "tokens", None)
    inputs = as_inputs(inputs, model_device(model))
    B, T = batch_shape(inputs)
    _refuse_negative_on_right_padding(inputs, positions)
    pos = resolve_positions(positions, T, model_device(model))
    with eval_mode(model, "cache_activations"):
        store, output = capture(model, inputs, layers, pos, layers_path, stop_early, kind)
    device = model_device(model)  # layers may sit on several devices (device_map)
    acts = torch.stack([store[l].to(device) for l in layers], 1)
    return ActivationCache(acts, layers, pos, output, tokens, kind.name,
                           kind.units(model, acts.shape[-1]) if kind.unit == "head" else 1)


def metric_gradients(model, inputs, metric, index, layers, pos, layers_path, kind=RESID):
    """One forward with gradients and one backward: (metric values, [h_l at pos],
    [dm/dh_l at pos]) per requested layer of ``kind`` (the gradient of the summed
    metric, so each row's gradient is its own metric's)."""
    captured = {}

    def make(key):
        def fn(hidden):
            if key == "leaf":  # gradients must reach every site even with frozen weights;
                # a clone of the new leaf (not the leaf itself) keeps hook-based tools
                # (FlopCounterMode's module tracker) working with autograd.grad
                hidden = hidden.detach().requires_grad_(True).clone()
                if kind.from_embeddings and 0 in layers:
                    captured[0] = hidden
                return hidden
            captured[key] = hidden
            return None
        return fn

    # the embeddings' output made a leaf; the kind's own sites captured where they are
    handles = [register_site_hook(model, 0, make("leaf"), layers_path)]
    handles += [kind.register(model, l, make(l), layers_path) for l in layers
                if not (kind.from_embeddings and l == 0)]
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
    """Activations and the metric's gradient at them: ``acts`` and ``grads``
    (batch, len(layers), len(positions), W); ``metric`` (batch,); ``sites`` the kind."""
    acts: torch.Tensor
    grads: torch.Tensor
    metric: torch.Tensor
    layers: list
    positions: torch.Tensor
    sites: str = "resid"


def cache_gradients(model, inputs, metric, layers=None, positions=None, *, layers_path=None,
                    sites="resid"):
    """Activations and dm/dh at the requested sites (any kind, as in
    :func:`cache_activations`) from one forward and one backward (to the activations
    only; the model's weights get no gradient).
    ``metric(logits, pair_index)`` gives one value per row of ``inputs``."""
    device = model_device(model)
    kind = site_kind(sites)
    layers = resolve_site_layers(model, kind, layers, layers_path)
    metric = as_metric(metric)
    inputs = as_inputs(inputs, device)
    B, T = batch_shape(inputs)
    check_metric_pairs(metric, B)
    pos = resolve_positions(positions, T, device)
    with eval_mode(model, "cache_gradients"):
        m, acts, grads = metric_gradients(model, inputs, metric,
                                           torch.arange(B, device=device), layers, pos,
                                           layers_path, kind)
    return GradientCache(torch.stack([a.to(device) for a in acts], 1),
                         torch.stack([g.to(device) for g in grads], 1), m, layers, pos,
                         kind.name)
