"""One patched forward of a reuse sweep (steerops.sweeps.reuse): the rows' inputs over the
base run's cropped KV cache, blocks before the site stood in for, the site written
(a residual column, or a component through its site kind's hook), the LM head at the
metric's position only (or deferred, to run batched over many forwards)."""
import copy
import inspect
from dataclasses import dataclass

import torch

from .. import ops
from ..model.blocks import register_site_hook
from ..model.sites import split_units
from ..ops.backend import unchecked


class _SkippedBlock(torch.nn.Module):
    """Stands in for a block for one forward: returns ``output`` (or, when None,
    its input unchanged) without computing; other attributes read through to the
    real block (models read e.g. ``attention_type`` off their layers)."""

    def __init__(self, inner, output, as_tuple):
        super().__init__()
        self.__dict__["_inner"] = inner
        self.__dict__["_output"] = output
        self.__dict__["_as_tuple"] = as_tuple

    def forward(self, *args, **kwargs):
        out = self.__dict__["_output"]
        if out is None:
            out = args[0] if args else kwargs["hidden_states"]
        return (out,) if self.__dict__["_as_tuple"] else out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_inner"], name)


def cache_keyword(model):
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def crop_cache(cache, length):
    """A copy of ``cache`` holding the first ``length`` positions, or None when
    this cache type cannot be cropped (then the prefix is recomputed)."""
    if isinstance(cache, (tuple, list)):  # legacy ((k, v), ...) with k (B, H, T, d)
        return tuple(tuple(t[..., :length, :] for t in layer) for layer in cache)
    if not hasattr(cache, "crop") or not hasattr(cache, "batch_select_indices"):
        return None
    out = copy.deepcopy(cache)
    drop = int(out.get_seq_length()) - length
    try:
        if drop > 0:
            # a negative argument removes that many tokens in every release (a
            # positive one keeps that many in 4.x and is refused in 5.x)
            out.crop(-drop)
    except Exception:  # e.g. static / hybrid caches that do not crop
        return None
    return out if int(out.get_seq_length()) == length else None


def _select(cache, rows):
    if isinstance(cache, tuple):
        return tuple(tuple(t[rows] for t in layer) for layer in cache)
    out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    return out


def _slice_inputs(inputs, rows, start, T):
    """Rows of the inputs from column ``start`` on; the attention mask stays whole
    (it covers the cached prefix too)."""
    out = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
            continue
        value = value[rows]
        if key != "attention_mask" and value.dim() >= 2 and value.shape[1] == T:
            value = value[:, start:]
        out[key] = value
    return out


@dataclass
class BaseRun:
    """What every patched forward of a reuse sweep shares: the model and its blocks,
    the base run (inputs, logits, cache keyword), and how the forward may be cut."""
    model: object
    blocks: object
    metric: object
    target: dict
    kw: str
    as_tuple: bool
    skip_layers: bool
    head: object
    deferred: bool
    base_logits: torch.Tensor
    model_output: object
    T: int
    layers_path: str = None

    def inputs(self, rows, start, prefix):
        """The rows' inputs from column ``start`` on, over the cached prefix if any."""
        inputs = _slice_inputs(self.target, rows, start, self.T)
        if prefix is not None:
            inputs[self.kw] = _select(prefix, rows)
            inputs["use_cache"] = True
        else:
            inputs["use_cache"] = False
        return inputs

    def stand_in(self, l, output):
        """Blocks 0..l-1 replaced for one forward (the last returns ``output``): the
        swapped-out blocks, to put back."""
        swapped = []
        for b in range(l):
            swapped.append((b, self.blocks[b]))
            self.blocks[b] = _SkippedBlock(self.blocks[b], output if b == l - 1 else None,
                                           self.as_tuple)
        return swapped

    def run(self, inputs, handles, swapped, rows, start):
        """The forward with ``handles`` hooked and ``swapped`` blocks stood in for, the
        head at the metric's position only; the metric per row, or with ``deferred``
        the rows' last hidden state (the head's input, for one batched head call)."""
        last = []
        if self.deferred:
            def keep_last(m, args):  # the head sees zero positions; it runs batched later
                last.append(args[0][:, -1])
                return (args[0][:, :0],) + tuple(args[1:])
            handles.append(self.head.register_forward_pre_hook(keep_last))
        elif self.head is not None:
            handles.append(self.head.register_forward_pre_hook(
                lambda m, args: (args[0][:, -1:],) + tuple(args[1:])))
        try:
            logits = self.model_output(self.model(**inputs))
        finally:
            for h in handles:
                h.remove()
            for b, block in swapped:
                self.blocks[b] = block
        if self.deferred:
            return last[0]
        if self.head is None and start > 0:
            logits = torch.cat([self.base_logits[rows, :start].to(logits.dtype), logits], 1)
        return self.metric(logits, rows).float()


def patched_metric(base, rows, cols, start, l, source_rows, base_hidden, prefix):
    """Metric of a forward from column ``start`` on, row i patched at layer l,
    column ``cols[i]`` (with ``prefix``: the base run's cache up to ``start``).
    With ``deferred``, the head is not run: returns the rows' last hidden state
    (the head's input), for one batched head call over many forwards."""
    inputs = base.inputs(rows, start, prefix)
    local = cols - start  # the patched column of each row among the new tokens
    index = torch.arange(rows.numel(), device=rows.device)
    handles, swapped = [], []
    if base.skip_layers and l >= 1:
        patched = base_hidden[rows, start:].clone()
        patched[index, local] = source_rows.to(patched.dtype)
        swapped = base.stand_in(l, patched)
    else:
        def patch_columns(h):
            h = h.clone()
            h[index, local] = source_rows.to(h.dtype)
            return h
        handles.append(register_site_hook(base.model, l, patch_columns, base.layers_path))
    return base.run(inputs, handles, swapped, rows, start)


def patched_component_metric(base, rows, units, js, cols, start, l, kind, source, pos,
                              per_position, base_hidden, prefix):
    """:func:`patched_metric` for a component site: blocks 0..l-1 stood in for by the
    base run's residual stream entering block l (from ``start`` on), and a hook on the
    component in block l writing row i's unit ``units[i]`` at position ``cols[i]``
    (``per_position=False``: at every requested position from ``cols[i]`` on) from
    ``source`` (rows, P, U, W / U)."""
    inputs = base.inputs(rows, start, prefix)
    # (row, position index) pairs to write
    if per_position:
        ii, jj = torch.arange(rows.numel(), device=rows.device), js
    else:
        ii, jj = (pos[None, :] >= cols[:, None]).nonzero(as_tuple=True)
    local = pos[jj] - start
    values = source[ii, jj, units[ii]]                   # (writes, W / U)
    U = source.shape[2]
    src = torch.arange(values.shape[0], device=values.device)

    def write(h):
        # through the fused patch kernel: h viewed as (rows x positions x units) rows of
        # W / U columns, one launch for every write of the forward
        view = split_units(h, U)
        out = view if view.is_contiguous() else view.contiguous()
        dst = (ii * out.shape[1] + local) * U + units[ii]
        with unchecked():  # indices built here, in range by construction
            ops.patch_(out, values.to(out.dtype), dst, src)
        return None if out is view else out.flatten(-2)
    handles = [kind.register(base.model, l, write, base.layers_path)]
    swapped = base.stand_in(l, base_hidden[rows, start:]) if base.skip_layers and l >= 1 else []
    return base.run(inputs, handles, swapped, rows, start)
