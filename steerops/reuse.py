"""Patching sweeps at their floor: a patched run at site (l, p) of a causal LM
changes only layers l+1..L at positions >= p; everything else is the base run's.

For each site the sweep therefore runs only the new part:

- sites where the source and base activations are identical (every position
  before the first differing token) are the base run: no forward at all;
- positions before p come from the base run's KV cache, cropped to p (the
  model's own cache object; ``crop`` / ``batch_select_indices``);
- blocks 1..l are skipped: they are replaced, for that forward only, by
  stand-ins returning the base run's layer-l hidden state with column p patched
  (where a block returns its hidden state alone: a tensor, or a 1-tuple; blocks
  that also return their cache (GPT-2 / GPT-NeoX in transformers 4.x) run, and a
  hook patches: reported as ``layers_skipped: False``);
- the LM head runs only at the metric's positions (``logit_diff`` / ``prob_diff``
  at the default last position), batched over many forwards when the model's
  logits are the head's output unchanged (checked on the base run: no
  softcapping or scaling after the head); otherwise the logits before p are the base
  run's and are joined to the new ones, so any metric sees full logits.

Padding: with a left-padded batch, transformers unmasks attention at the padding
positions themselves, so their logits see later tokens; under reuse the logits
at padding positions before p are the base run's. Metrics read real tokens.

``reuse="none"`` (the plain batched sweep) stays the reference and the path for
encoders and non-causal models.
"""
import copy
import inspect

import torch

from .models import find_layers, register_site_hook

REUSE_MODES = ("auto", "none", "prefix", "full")


def is_causal_lm(model):
    """A decoder-only model whose position t never sees later tokens."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    return bool(getattr(cfg, "is_decoder", False) or (callable(can_generate) and can_generate()))


def choose_form(model, reuse):
    """(form, why): the sweep's form for ``reuse`` ('auto' chooses) and the reason."""
    if reuse not in REUSE_MODES:
        raise ValueError(f"reuse must be one of {REUSE_MODES}, got {reuse!r}")
    causal = is_causal_lm(model)
    split = len({p.device for p in model.parameters()}) > 1
    if reuse == "auto":
        if not causal:
            return "none", "auto: not a causal LM (a position may see later tokens)"
        if split:
            # the reuse path's cache crops and block stand-ins are checked on one device
            return "none", "auto: the model is split over devices (device_map)"
        return "full", "auto: a causal LM on one device"
    if reuse != "none" and not causal:
        raise ValueError(
            f"reuse={reuse!r} needs a causal LM (a position must not see later tokens); "
            f"{type(model).__name__} is not one: use reuse='none'")
    return reuse, "asked for"


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


def _cache_keyword(model):
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _crop(cache, length):
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


def last_position_head(model, metric):
    """The LM head, when the metric reads only the last position's logits."""
    if getattr(metric, "positions", None) != (-1,):
        return None
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def reuse_sweep(model, source_store, target, metric, layers, pos, *, mode, batch_size,
                model_output, layers_path=None, progress=True):
    """Raw metric values (pairs, len(layers), P) of the denoising/noising sweep
    (the caller decides which run is the source; ``source_store[l]`` is (pairs, P,
    D)), computing only what differs from the ``target`` base run. Returns (raw,
    the base run's metric (pairs,), report of what was reused)."""
    from tqdm.auto import tqdm

    tokens = target.get("input_ids", target.get("inputs_embeds"))
    pairs, T = tokens.shape[:2]
    device = pos.device
    blocks = find_layers(model, layers_path)
    # the base run again, keeping its cache and every requested layer's hidden states
    hidden, formats = {}, []

    def keep(layer):
        def fn(h):
            hidden[layer] = h.detach()
        return fn
    handles = [register_site_hook(model, l, keep(l), layers_path) for l in layers]
    # a block whose output is its hidden state alone (a tensor, or a 1-tuple in
    # transformers 4.x) can be stood in for; one that also returns its cache cannot
    handles.append(blocks[0].register_forward_hook(lambda m, a, out: formats.append(
        "tensor" if isinstance(out, torch.Tensor) else
        "tuple" if isinstance(out, tuple) and len(out) == 1 else "other")))
    head = last_position_head(model, metric)
    head_input = []
    if head is not None:
        handles.append(head.register_forward_pre_hook(
            lambda m, args: head_input.append(args[0])))
    kw = _cache_keyword(model)
    try:
        with torch.no_grad():
            out = model(**target, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    base_logits = model_output(out)
    cache = getattr(out, "cache", None)
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    skip_layers = mode == "full" and bool(formats) and formats[0] != "other"
    as_tuple = bool(formats) and formats[0] == "tuple"
    # the head can be batched over many forwards when the model's logits are the
    # head's output unchanged (no softcapping or scaling after it)
    with torch.no_grad():
        deferred = head is not None and len(head_input) == 1 and \
            head_input[0].shape[:2] == base_logits.shape[:2] and \
            torch.equal(head(head_input[0]), base_logits)
    every = torch.arange(pairs, device=device)
    base_metric = metric(base_logits, every).float()
    raw = base_metric[:, None, None].expand(pairs, len(layers), pos.numel()).clone()
    report = {"mode": mode, "layers_skipped": skip_layers, "lm_head_last_only": head is not None,
              "lm_head_batched": deferred,
              "prefix_from_cache": True, "sites": pairs * len(layers) * pos.numel(),
              "identical_sites_skipped": 0, "forwards": 1, "rows": pairs,
              "token_layers_run": 0, "token_layers_plain": 0, "head_tokens": 0}
    L = len(blocks)
    prefix_cache = {}

    def prefix(start):
        """The base cache cropped to ``start``; one crop held at a time (chunks run
        in order of their start column), so memory stays at one extra cache."""
        if start > 0 and start not in prefix_cache:
            prefix_cache.clear()
            prefix_cache[start] = _crop(cache, start) if cache is not None else None
            if prefix_cache[start] is None:
                report["prefix_from_cache"] = False
        return prefix_cache.get(start)

    chunks = sorted(_chunks(source_store, hidden, layers, pos, T, report), key=lambda ch: ch[2])
    # deferred head, per layer: (pair rows, position indices, last hidden). A head batch
    # never mixes layers, so a layer's values do not depend on which other layers the
    # sweep covers (distributed units of one pair block run together; see patching.py)
    pending = {li: [] for li in range(len(layers))}

    def flush(li):
        if not pending[li]:
            return
        r = torch.cat([p[0] for p in pending[li]])
        logits = head(torch.cat([p[2] for p in pending[li]])[:, None])
        values = metric(logits, r).float()
        offset = 0
        for rows, jr, _ in pending[li]:
            raw[rows, li, jr] = values[offset:offset + rows.numel()]
            offset += rows.numel()
        pending[li].clear()

    with torch.no_grad():
        for li, l, start, pair_rows, js, cols in tqdm(chunks, disable=not progress,
                                                       desc="patching sweep", unit="chunk"):
            cached = prefix(start)
            first = start if (start == 0 or cached is not None) else 0
            for b in range(0, pair_rows.numel(), batch_size):
                r, jr, cr = (t[b:b + batch_size] for t in (pair_rows, js, cols))
                value = _patched_metric(
                    model, blocks, metric, target, r, cr, first, l, source_store[l][r, jr],
                    hidden[l], cached if first > 0 else None, kw, as_tuple, skip_layers,
                    head, deferred, base_logits, model_output, T, layers_path)
                if deferred:
                    pending[li].append((r, jr, value))
                    if sum(p[0].numel() for p in pending[li]) >= batch_size:
                        flush(li)
                else:
                    raw[r, li, jr] = value
                report["forwards"] += 1
                report["rows"] += r.numel()
                report["token_layers_run"] += r.numel() * (T - first) * (
                    L - l if skip_layers else L)
                report["head_tokens"] += r.numel() * (1 if head is not None else T - first)
        for li in pending:
            flush(li)
    report["token_layers_plain"] = pairs * len(layers) * pos.numel() * T * L
    report["token_layers_floor"] = int(sum(
        pairs * (L - l) * (T - c) for l in layers for c in pos.tolist()))
    return raw, base_metric, report


# a row of a chunk starting at column a but patched at column c computes c - a
# tokens it would not need on its own: bounded by this fraction of its floor
CHUNK_WASTE = 0.15


def _chunks(source_store, hidden, layers, pos, T, report):
    """Forward groups of the sites whose source and base activations differ (the
    identical ones are dropped, counted in the report): see :func:`group_chunks`."""
    pairs = next(iter(hidden.values())).shape[0]
    differing = {}
    for li, l in enumerate(layers):
        for j, c in enumerate(pos.tolist()):
            rows = (source_store[l][:, j] != hidden[l][:, c]).any(-1).nonzero().flatten()
            report["identical_sites_skipped"] += pairs - rows.numel()
            differing[li, j] = rows
    return group_chunks(differing, layers, pos, T)


def group_chunks(differing, layers, pos, T):
    """Forward groups: per layer, runs of consecutive computed positions that
    share a start column (so a forward holds many rows: on a CPU or with few
    pairs, per-forward weight reads dominate), each row computing at most
    CHUNK_WASTE of its own floor in extra tokens. ``differing[li, j]``: the pair
    rows whose site (layers[li], pos[j]) must be computed (the sweep measures
    them; :func:`steerops.plan_sweep` predicts them from the inputs).
    Returns [(layer index, layer, start column, pair rows, position indices, columns)]."""
    out = []
    for li, l in enumerate(layers):
        per_pos = [(c, j, differing[li, j]) for j, c in enumerate(pos.tolist())
                   if differing[li, j].numel()]
        per_pos.sort(key=lambda x: x[0])
        k = 0
        while k < len(per_pos):
            start = per_pos[k][0]
            members = [per_pos[k]]
            k += 1
            while k < len(per_pos) and per_pos[k][0] - start <= CHUNK_WASTE * (T - per_pos[k][0]):
                members.append(per_pos[k])
                k += 1
            rows = torch.cat([m[2] for m in members])
            js = torch.cat([torch.full_like(m[2], m[1]) for m in members])
            cols = torch.cat([torch.full_like(m[2], m[0]) for m in members])
            out.append((li, l, start, rows, js, cols))
    return out


def _patched_metric(model, blocks, metric, target, rows, cols, start, l, source_rows,
                    base_hidden, prefix, kw, as_tuple, skip_layers, head, deferred,
                    base_logits, model_output, T, layers_path):
    """Metric of a forward from column ``start`` on, row i patched at layer l,
    column ``cols[i]`` (with ``prefix``: the base run's cache up to ``start``).
    With ``deferred``, the head is not run: returns the rows' last hidden state
    (the head's input), for one batched head call over many forwards."""
    inputs = _slice_inputs(target, rows, start, T)
    local = cols - start  # the patched column of each row among the new tokens
    index = torch.arange(rows.numel(), device=rows.device)
    if prefix is not None:
        inputs[kw] = _select(prefix, rows)
        inputs["use_cache"] = True
    else:
        inputs["use_cache"] = False
    handles, swapped = [], []
    if skip_layers and l >= 1:
        patched = base_hidden[rows, start:].clone()
        patched[index, local] = source_rows.to(patched.dtype)
        for b in range(l):
            swapped.append((b, blocks[b]))
            blocks[b] = _SkippedBlock(blocks[b], patched if b == l - 1 else None, as_tuple)
    else:
        def patch_columns(h):
            h = h.clone()
            h[index, local] = source_rows.to(h.dtype)
            return h
        handles.append(register_site_hook(model, l, patch_columns, layers_path))
    last = []
    if deferred:
        def keep_last(m, args):  # the head sees zero positions here; it runs batched later
            last.append(args[0][:, -1])
            return (args[0][:, :0],) + tuple(args[1:])
        handles.append(head.register_forward_pre_hook(keep_last))
    elif head is not None:
        handles.append(head.register_forward_pre_hook(
            lambda m, args: (args[0][:, -1:],) + tuple(args[1:])))
    try:
        logits = model_output(model(**inputs))
    finally:
        for h in handles:
            h.remove()
        for b, block in swapped:
            blocks[b] = block
    if deferred:
        return last[0]
    if head is None and start > 0:
        logits = torch.cat([base_logits[rows, :start].to(logits.dtype), logits], 1)
    return metric(logits, rows).float()
