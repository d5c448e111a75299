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

Component sites (steerops.model.sites: heads, attention and MLP outputs, resid_mid) in
block b at position p: blocks 0..b-1 are stood in for with the base run's residual
stream entering block b, and a hook on the component writes it; the rest as above.
One patched forward is :mod:`steerops.sweeps.reuse_forward`.

``reuse="none"`` (the plain batched sweep) stays the reference and the path for
encoders and non-causal models.
"""
import torch

from ..model.blocks import find_layers, register_site_hook
from ..model.sites import RESID, split_units
from .reuse_forward import (BaseRun, cache_keyword, crop_cache, patched_component_metric,
                            patched_metric)

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


def last_position_head(model, metric):
    """The LM head, when the metric reads only the last position's logits."""
    if getattr(metric, "positions", None) != (-1,):
        return None
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def prepare_base_run(model, target, metric, layers, *, mode, model_output, layers_path=None,
                     kind=RESID):
    """The base run of a reuse sweep, once: its forward with the cache kept, the
    residual stream entering every requested layer (``hidden``) and, for a component
    kind, the component (``own``). Returns (BaseRun, hidden, own, cache, the base
    run's metric (pairs,)); every patched forward then runs over it."""
    tokens = target.get("input_ids", target.get("inputs_embeds"))
    pairs, T = tokens.shape[:2]
    device = tokens.device
    blocks = find_layers(model, layers_path)
    # the base run again, keeping its cache, the residual stream entering every
    # requested layer (a component's block input: resid layer b) and the component
    hidden, own, formats = {}, {}, []

    def keep(store, layer):
        def fn(h):
            store[layer] = h.detach()
        return fn
    handles = [register_site_hook(model, l, keep(hidden, l), layers_path) for l in layers]
    if kind is not RESID:
        handles += [kind.register(model, l, keep(own, l), layers_path) for l in layers]
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
    kw = cache_keyword(model)
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
    base = BaseRun(model, blocks, metric, target, kw, as_tuple, skip_layers, head, deferred,
                   base_logits, model_output, T, layers_path)
    return base, hidden, own, cache, base_metric


def reuse_sweep(model, source_store, target, metric, layers, pos, *, mode, batch_size,
                model_output, layers_path=None, progress=True, kind=RESID, per_position=True):
    """Raw metric values (pairs, len(layers), P) of the denoising/noising sweep
    (the caller decides which run is the source; ``source_store[l]`` is (pairs, P,
    D)), computing only what differs from the ``target`` base run. Returns (raw,
    the base run's metric (pairs,), report of what was reused).

    A component ``kind`` (steerops.model.sites) in block b at position p changes block b
    only from that component on and only at positions >= p: blocks 0..b-1 are the
    base run's (stood in for, as for the residual stream at layer b), positions
    before p come from the KV cache, and a hook writes the component in block b.
    Then raw is (pairs, len(layers), P or 1, units): a site is (block, position,
    unit), or with ``per_position=False`` (block, unit) written at every position
    from the first that differs (before it the source is the base run's)."""
    from tqdm.auto import tqdm

    tokens = target.get("input_ids", target.get("inputs_embeds"))
    pairs, T = tokens.shape[:2]
    base, hidden, own, cache, base_metric = prepare_base_run(
        model, target, metric, layers, mode=mode, model_output=model_output,
        layers_path=layers_path, kind=kind)
    blocks, skip_layers, head, deferred = base.blocks, base.skip_layers, base.head, base.deferred
    width = source_store[layers[0]].shape[-1]
    U = kind.units(model, width)
    columns = pos.numel() if per_position else 1
    raw = base_metric[:, None, None, None].expand(pairs, len(layers), columns, U).clone()
    report = {"mode": mode, "layers_skipped": skip_layers, "lm_head_last_only": head is not None,
              "lm_head_batched": deferred,
              "prefix_from_cache": True, "sites": pairs * len(layers) * columns * U,
              "identical_sites_skipped": 0, "forwards": 1, "rows": pairs,
              "token_layers_run": 0, "token_layers_plain": 0, "head_tokens": 0}
    L = len(blocks)
    prefix_cache = {}

    def prefix(start):
        """The base cache cropped to ``start``; one crop held at a time (chunks run
        in order of their start column), so memory stays at one extra cache."""
        if start > 0 and start not in prefix_cache:
            prefix_cache.clear()
            prefix_cache[start] = crop_cache(cache, start) if cache is not None else None
            if prefix_cache[start] is None:
                report["prefix_from_cache"] = False
        return prefix_cache.get(start)

    # chunk rows are (pair, unit) rows: pair * U + unit
    differing = _differing(source_store, own if kind is not RESID else hidden, layers, pos,
                           U, per_position, report)
    chunks = sorted(group_chunks(differing, layers, pos, T), key=lambda ch: ch[2])
    # deferred head, per layer: (where in raw, last hidden). A head batch never mixes
    # layers, so a layer's values do not depend on which other layers the sweep covers
    # (distributed units of one pair block run together; see patching.py)
    pending = {li: [] for li in range(len(layers))}

    def flush(li):
        if not pending[li]:
            return
        where = [torch.cat(parts) for parts in zip(*(p[0] for p in pending[li]))]
        logits = head(torch.cat([p[1] for p in pending[li]])[:, None])
        raw[where[0], li, where[1], where[2]] = metric(logits, where[0]).float()
        pending[li].clear()

    with torch.no_grad():
        for li, l, start, site_rows, js, cols in tqdm(chunks, disable=not progress,
                                                       desc="patching sweep", unit="chunk"):
            cached = prefix(start)
            first = start if (start == 0 or cached is not None) else 0
            for b in range(0, site_rows.numel(), batch_size):
                v, jr, cr = (t[b:b + batch_size] for t in (site_rows, js, cols))
                r, units = v // U, v % U
                prefix_rows = cached if first > 0 else None
                if kind is RESID:
                    value = patched_metric(base, r, cr, first, l, source_store[l][r, jr],
                                            hidden[l], prefix_rows)
                else:
                    value = patched_component_metric(
                        base, r, units, jr, cr, first, l, kind,
                        split_units(source_store[l][r], U), pos, per_position, hidden[l],
                        prefix_rows)
                where = (r, jr if per_position else torch.zeros_like(jr), units)
                if deferred:
                    pending[li].append((where, value))
                    if sum(p[0][0].numel() for p in pending[li]) >= batch_size:
                        flush(li)
                else:
                    raw[where[0], li, where[1], where[2]] = value
                report["forwards"] += 1
                report["rows"] += r.numel()
                report["token_layers_run"] += r.numel() * (T - first) * (
                    L - l if skip_layers else L)
                report["head_tokens"] += r.numel() * (1 if head is not None else T - first)
        for li in pending:
            flush(li)
    report["token_layers_plain"] = pairs * len(layers) * columns * U * T * L
    report["token_layers_floor"] = int(sum(
        pairs * U * (L - l) * (T - c) for l in layers
        for c in (pos.tolist() if per_position else pos.tolist()[:1])))
    return (raw[..., 0] if kind is RESID else raw), base_metric, report


# a row of a chunk starting at column a but patched at column c computes c - a
# tokens it would not need on its own: bounded by this fraction of its floor
CHUNK_WASTE = 0.15


def _differing(source_store, base, layers, pos, U, per_position, report):
    """The (pair, unit) rows whose source and base activations differ, per (layer,
    position index), as rows pair * U + unit (the identical ones are dropped, counted
    in the report; with ``per_position=False`` a (layer, unit) site sits at the first
    position where it differs). ``base[l]`` is the base run's (pairs, T, W)."""
    differing = {}
    cols = pos.tolist()
    for li, l in enumerate(layers):
        src = split_units(source_store[l], U)                 # (pairs, P, U, W / U)
        dst = split_units(base[l][:, cols], U)
        differs = (src != dst).any(-1)                       # (pairs, P, U)
        if per_position:
            for j in range(len(cols)):
                differing[li, j] = differs[:, j].flatten().nonzero().flatten()
            report["identical_sites_skipped"] += int((~differs).sum())
            continue
        anywhere = differs.any(1)                            # (pairs, U)
        # the index of the earliest differing column (positions may come in any order)
        columns = torch.as_tensor(cols, device=differs.device)[None, :, None]
        first = torch.where(differs, columns, torch.iinfo(torch.long).max).argmin(1)
        report["identical_sites_skipped"] += int((~anywhere).sum())
        for j in range(len(cols)):
            differing[li, j] = (anywhere & (first == j)).flatten().nonzero().flatten()
    return differing


def group_chunks(differing, layers, pos, T):
    """Forward groups: per layer, runs of consecutive computed positions that
    share a start column (so a forward holds many rows: on a CPU or with few
    pairs, per-forward weight reads dominate), each row computing at most
    CHUNK_WASTE of its own floor in extra tokens. ``differing[li, j]``: the pair
    rows whose site (layers[li], pos[j]) must be computed (the sweep measures
    them; :func:`steerops.plan_sweep` predicts them from the inputs); for heads, rows
    pair * H + head.
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
