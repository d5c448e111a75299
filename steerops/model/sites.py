"""Site kinds: where an intervention reads and writes, as one kind of object.

A site kind owns its hook point in each architecture family, its numbering and
index axes, and how a batch of activations splits into the units a site names
(one vector per position, or one slice per attention head, or one neuron). The
residual stream is one kind among them; caching, AtP, the plain patching sweep
and the maps take any kind (docs/sites.md).

Kinds (``SITE_KINDS``):

- ``resid``: the residual stream, numbered as ``output_hidden_states``
  (0 = embeddings .. L = output of the last block). The default.
- ``resid_mid``: the residual stream between attention and MLP of block b
  (sequential blocks only; GPT-NeoX with a parallel residual has none).
- ``attn_out`` / ``mlp_out``: what block b's attention / MLP adds to the residual
  stream (after Gemma 2's post-norms).
- ``head_out``: head h's d_head slice of the input of block b's attention output
  projection (with grouped-query attention, the query heads).
- ``neuron``: block b's MLP hidden activations after the nonlinearity (the input
  of the down projection).

Components are numbered by block b = 0..L-1 (TransformerLens' numbering).
Adding a kind is one :class:`SiteKind` in ``SITE_KINDS``.
"""
from dataclasses import dataclass

import torch

from .blocks import (_hidden_from_call, _hidden_from_output, _replace_hidden_in_call,
                     _replace_hidden_in_output, find_layers, register_site_hook, resolve_layers)

# Module names by architecture family, tried in order inside one block.
ATTENTION = ("self_attn", "attn", "attention")
ATTENTION_OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")
MLP = ("mlp", "feed_forward")
MLP_DOWN_PROJ = ("down_proj", "c_proj", "dense_4h_to_h", "fc_out", "fc2")


def _child(module, names, what, kind):
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, torch.nn.Module):
            return found
    children = ", ".join(n for n, _ in module.named_children())
    raise ValueError(f"sites={kind!r}: cannot find the {what} of {type(module).__name__} "
                     f"(looked for {', '.join(names)}; it has {children})")


def _sandwich_norms(block):
    """Gemma 2/3 normalise each sublayer's output before adding it to the residual."""
    return hasattr(block, "pre_feedforward_layernorm") and \
        hasattr(block, "post_feedforward_layernorm")


def attention_contribution(block, kind="attn_out"):
    """The module whose output is what attention adds to the residual stream."""
    if _sandwich_norms(block):
        return block.post_attention_layernorm
    return _child(block, ATTENTION, "attention module", kind)


def mlp_contribution(block, kind="mlp_out"):
    if _sandwich_norms(block):
        return block.post_feedforward_layernorm
    return _child(block, MLP, "MLP module", kind)


def parallel_residual(block):
    """Blocks whose attention and MLP both read the block input (GPT-NeoX's default,
    GPT-J): they have no residual stream between the two."""
    if getattr(block, "use_parallel_residual", False):
        return True
    return not any(hasattr(block, n) for n in ("ln_2", "post_attention_layernorm",
                                                "pre_feedforward_layernorm"))


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


def _on_output(module, fn):
    def hook(mod, args, output):
        new = fn(_hidden_from_output(output))
        return None if new is None else _replace_hidden_in_output(output, new)
    return module.register_forward_hook(hook)


def _on_input(module, fn):
    def hook(mod, args, kwargs):
        new = fn(_hidden_from_call(args, kwargs))
        return None if new is None else _replace_hidden_in_call(args, kwargs, new)
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _register_resid_mid(model, block_index, fn, layers_path=None):
    """resid_mid = block input + attention's contribution. ``fn`` sees that sum; a
    value it writes (in place or returned) replaces it, through the contribution:
    unchanged, the model's numbers are exactly its own, and gradients reach the
    value ``fn`` saw, once."""
    block = find_layers(model, layers_path)[block_index]
    if parallel_residual(block):
        raise ValueError(f"sites='resid_mid': {type(block).__name__} adds attention and MLP "
                         f"to the residual stream in parallel (both read the block input), so "
                         f"there is no residual stream between them; use 'attn_out' or 'mlp_out'")
    seen = {}

    def keep_input(mod, args, kwargs):
        seen["resid_pre"] = _hidden_from_call(args, kwargs)

    def contribution(out):
        r = seen.pop("resid_pre")
        mid = r + out
        before = mid.detach().clone()
        new = fn(mid)
        new = mid if new is None else new
        delta = new.detach() - before  # zero unless fn wrote a value
        if not (torch.is_grad_enabled() and new.requires_grad):
            return out + delta if bool(delta.any()) else None
        # value out + delta (residual = new); gradient reaches the residual only through new
        return (out.detach() + delta + (new - new.detach()) - (r - r.detach()))
    return _Handles(block.register_forward_pre_hook(keep_input, with_kwargs=True),
                    _on_output(attention_contribution(block, "resid_mid"), contribution))


@dataclass(frozen=True)
class SiteKind:
    """One kind of site. ``module(block)`` gives the module whose ``where`` ('input'
    or 'output') is the site's activation (B, T, W); ``unit`` names the axis a
    position splits into (None: one vector per position; 'head': W = H x d_head;
    'neuron': every element its own site); ``from_embeddings``: numbered 0..L with
    the embeddings as 0 (the residual stream) rather than by block 0..L-1."""
    name: str
    description: str
    module: object = None
    where: str = "output"
    unit: str = None
    from_embeddings: bool = False
    register_fn: object = None  # a kind that is not one module's input or output

    @property
    def layer_axis(self):
        return "layer" if self.from_embeddings else "block"

    def num_layers(self, model, layers_path=None):
        n = len(find_layers(model, layers_path))
        return n + 1 if self.from_embeddings else n

    def register(self, model, layer, fn, layers_path=None):
        """Calls ``fn(activation) -> None | Tensor`` on the site's activation (B, T, W) in
        ``layer``; a returned tensor (or an in-place write) replaces it. Returns a handle."""
        if self.from_embeddings:
            return register_site_hook(model, layer, fn, layers_path)
        if self.register_fn is not None:
            return self.register_fn(model, layer, fn, layers_path)
        block = find_layers(model, layers_path)[layer]
        module = self.module(block, self.name)
        return (_on_input if self.where == "input" else _on_output)(module, fn)

    def units(self, model, width):
        """How many sites one position of a (.., W) activation holds (heads: read off
        the config, ``width`` checked when given)."""
        if self.unit is None:
            return 1
        if self.unit == "neuron":
            return width
        cfg = getattr(model, "config", None)
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        if not heads or (width is not None and width % heads):
            raise ValueError(f"sites={self.name!r}: cannot split width {width} into heads "
                             f"(config num_attention_heads {heads})")
        return heads

    def axes(self, per_position=True):
        """The axis names of a map of this kind (after the pair axis, if any)."""
        if self.unit == "head":
            return (self.layer_axis, "head", "position") if per_position else \
                (self.layer_axis, "head")
        if self.unit == "neuron":
            return (self.layer_axis, "position", "neuron")
        return (self.layer_axis, "position")

    def arrange(self, values, per_position=True):
        """From the sweeps' layout (..., layers, positions, units) to :meth:`axes`'s
        order (with ``per_position=False`` the positions axis is absent)."""
        if not per_position:
            return values if self.unit else values.squeeze(-1)
        if self.unit == "head":
            return values.transpose(-1, -2)
        return values if self.unit == "neuron" else values.squeeze(-1)


SITE_KINDS = {k.name: k for k in (
    SiteKind("resid", "the residual stream (0 = embeddings .. L = last block's output)",
             from_embeddings=True),
    SiteKind("resid_mid", "the residual stream between attention and MLP of block b",
             register_fn=_register_resid_mid),
    SiteKind("attn_out", "what block b's attention adds to the residual stream",
             module=attention_contribution),
    SiteKind("mlp_out", "what block b's MLP adds to the residual stream",
             module=mlp_contribution),
    SiteKind("head_out", "head h's slice of block b's attention output projection input",
             module=lambda block, kind: _child(_child(block, ATTENTION, "attention module",
                                                      kind),
                                               ATTENTION_OUT_PROJ, "attention output "
                                               "projection", kind),
             where="input", unit="head"),
    SiteKind("neuron", "block b's MLP activations after the nonlinearity",
             module=lambda block, kind: _child(_child(block, MLP, "MLP module", kind),
                                               MLP_DOWN_PROJ, "MLP down projection", kind),
             where="input", unit="neuron"),
)}

RESID = SITE_KINDS["resid"]
PATCHABLE = tuple(k for k in SITE_KINDS if k != "neuron")


def site_kind(sites, name="sites", allowed=None):
    """The :class:`SiteKind` named by ``sites`` (a name or a kind), validated."""
    if isinstance(sites, SiteKind):
        kind = sites
    elif isinstance(sites, str) and sites in SITE_KINDS:
        kind = SITE_KINDS[sites]
    else:
        raise ValueError(f"{name} must be one of {', '.join(repr(k) for k in SITE_KINDS)}, "
                         f"got {sites!r}")
    if allowed is not None and kind.name not in allowed:
        raise ValueError(f"{name}={kind.name!r} is not available here; use one of "
                         f"{', '.join(repr(k) for k in allowed)}")
    return kind


def resolve_site_layers(model, kind, layers, layers_path=None, name="layers"):
    """The kind's layers (blocks for components), validated; None means all."""
    count = None if kind.from_embeddings else kind.num_layers(model, layers_path)
    return resolve_layers(model, layers, layers_path, name, count)


def split_units(values, units):
    """(..., W) -> (..., units, W // units)."""
    return values.unflatten(-1, (units, values.shape[-1] // units))
