"""Prompts written as text: strings (or lists of strings) with a Hugging Face
tokenizer become the token ids the measuring calls take, answers written as
strings become single token ids, and results carry the token string of every
position.

Padding follows the tokenizer's ``padding_side``; a padded batch gets an
``attention_mask`` (and ``position_ids`` counted over the real tokens, as
``generate`` does, so a padded prompt sees the positions it would see alone). A
batch whose prompts all have one length gets no mask: the same call as with the
token ids alone, bit for bit.
"""
import inspect

import torch


class TextInputs(dict):
    """Model inputs made from text, with ``tokens``: the token string of every
    position of every row (padding shown as the tokenizer's pad token)."""
    tokens = None
    padded = False


def is_text(value):
    """A string, or a non-empty list/tuple of strings."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and len(value) > 0
                                      and all(isinstance(s, str) for s in value))


def check_prompt_list(value, name):
    """A list of prompts must be non-empty and all text (a ``None`` or an id list among
    strings is named, not left to fail deep inside)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} is empty: give at least one prompt (text), or token ids "
                             f"as a (batch, seq) tensor")
        if any(isinstance(v, str) for v in value) or any(v is None for v in value):
            for i, v in enumerate(value):
                if not isinstance(v, str):
                    raise ValueError(f"{name}[{i}] is {type(v).__name__}, not text: every "
                                     f"prompt in a list must be a string")


def require_tokenizer(tokenizer, name):
    if tokenizer is None:
        raise ValueError(f"{name} is text: pass tokenizer= (e.g. AutoTokenizer.from_pretrained("
                         f"folder)) to turn it into token ids")
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got "
                        f"{type(tokenizer).__name__}")


def _as_list(texts, name):
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{name}[{i}] is empty: give a prompt of at least one word")
    return texts


def _ids(tokenizer, text):
    return list(tokenizer(text)["input_ids"])


def token_strings(tokenizer, ids):
    """The token string of each id: ``[[str, ...], ...]`` for a (B, T) tensor or
    list of lists (one decode per id, so a leading space stays visible)."""
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return [[tokenizer.decode([int(i)]) for i in row] for row in rows]


def _pad_id(tokenizer, name):
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{name}: prompts of different token lengths need padding, and this "
                         f"tokenizer has no pad or eos token; set tokenizer.pad_token")
    return pad


def _pack(tokenizer, rows, name, device, model=None, side=None):
    """TextInputs from lists of ids, padded to one length on the tokenizer's side."""
    T = max(len(r) for r in rows)
    side = side or getattr(tokenizer, "padding_side", "right") or "right"
    padded = any(len(r) != T for r in rows)
    inputs = TextInputs()
    if not padded:
        inputs["input_ids"] = torch.tensor(rows, dtype=torch.long, device=device)
    else:
        pad = _pad_id(tokenizer, name)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            ids[i, cols] = torch.tensor(r, dtype=torch.long)
            mask[i, cols] = 1
        inputs["input_ids"], inputs["attention_mask"] = ids.to(device), mask.to(device)
        if model is not None and _accepts(model, "position_ids"):
            inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0).to(device)
        inputs.padded = True
    inputs.tokens = token_strings(tokenizer, inputs["input_ids"])
    if padded:
        pad_text = tokenizer.pad_token or "<pad>"
        for row, m in zip(inputs.tokens, inputs["attention_mask"].tolist()):
            row[:] = [t if keep else pad_text for t, keep in zip(row, m)]
    return inputs


def _accepts(model, name):
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def encode(tokenizer, texts, device=None, name="inputs", model=None, side=None):
    """One prompt or a list of prompts as :class:`TextInputs` (padded on the
    tokenizer's side when their lengths differ)."""
    require_tokenizer(tokenizer, name)
    texts = _as_list(texts, name)
    return _pack(tokenizer, [_ids(tokenizer, t) for t in texts], name, device, model, side)


def encode_pairs(tokenizer, clean, corrupt, device=None, model=None):
    """Aligned prompt pairs: clean[i] and corrupt[i] must tokenise to one length
    (a site is a position in both); pairs of different lengths are padded."""
    require_tokenizer(tokenizer, "clean")
    clean, corrupt = _as_list(clean, "clean"), _as_list(corrupt, "corrupt")
    if len(clean) != len(corrupt):
        raise ValueError(f"clean has {len(clean)} prompts and corrupt has {len(corrupt)}; "
                         f"give one corrupt prompt per clean prompt")
    a = [_ids(tokenizer, t) for t in clean]
    b = [_ids(tokenizer, t) for t in corrupt]
    for i, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y):
            raise ValueError(f"pair {i}: clean and corrupt tokenise to {len(x)} and {len(y)} "
                             f"tokens; patching needs them position by position. "
                             f"{side_by_side(tokenizer, x, y)}")
    return (_pack(tokenizer, a, "clean", device, model),
            _pack(tokenizer, b, "corrupt", device, model))


def side_by_side(tokenizer, x, y):
    """'position: clean | corrupt' for every position, differences marked with *."""
    a, b = token_strings(tokenizer, [x, y])
    cells = []
    for p in range(max(len(a), len(b))):
        u = a[p] if p < len(a) else "-"
        v = b[p] if p < len(b) else "-"
        cells.append(f"{p}{'*' if u != v else ''}: {u!r} | {v!r}")
    return "Position: clean | corrupt -- " + ", ".join(cells)


def single_token(tokenizer, text, name):
    """The id of ``text``, which must be exactly one token (no special tokens added)."""
    require_tokenizer(tokenizer, name)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        pieces = token_strings(tokenizer, [ids])[0]
        raise ValueError(f"{name} {text!r} is {len(ids)} tokens {pieces}, not one; the metric "
                         f"compares single next-token logits: pick an answer that is one token")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise ValueError(f"{name} {text!r} is not in the tokenizer's vocabulary (it maps to the "
                         f"unknown token {tokenizer.unk_token!r})")
    return ids[0]


def answer_ids(tokenizer, answers, name):
    """One token id per answer: a string gives an int, a list a 1-D tensor."""
    if isinstance(answers, str):
        return single_token(tokenizer, answers, name)
    return torch.tensor([single_token(tokenizer, a, f"{name}[{i}]")
                         for i, a in enumerate(answers)], dtype=torch.long)


def prompt_inputs(model, tokenizer, inputs, device, name="inputs", side=None):
    """Inputs for the one-prompt-set calls (caching, learning): text encoded, ids
    kept (labelled with token strings when a tokenizer is given)."""
    check_prompt_list(inputs, name)
    if is_text(inputs):
        return encode(tokenizer, inputs, device, name, model, side)
    if isinstance(inputs, TextInputs) and inputs.tokens is not None:
        return to_model(inputs, model, device)  # encoded (once) already: kept as it is
    if tokenizer is not None:
        require_tokenizer(tokenizer, name)
        return _labelled(tokenizer, inputs)
    return inputs


def to_model(inputs, model, device):
    """Encoded inputs made ready for ``model`` on ``device``: tensors moved, and position
    ids added to a padded batch when the model takes them (as encoding with the model
    does), so inputs encoded before the model loaded give the same numbers."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if not hasattr(inputs, "items"):
        return inputs
    out = type(inputs)((k, v.to(device) if isinstance(v, torch.Tensor) else v)
                       for k, v in inputs.items())
    out.__dict__.update(getattr(inputs, "__dict__", {}))
    mask = out.get("attention_mask")
    if getattr(out, "padded", False) and "position_ids" not in out and model is not None \
            and isinstance(mask, torch.Tensor) and _accepts(model, "position_ids"):
        out["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return out


def label_pairs(tokenizer, clean, corrupt):
    """Token-id pairs (tensors or dicts) labelled with their token strings."""
    require_tokenizer(tokenizer, "clean")
    return _labelled(tokenizer, clean), _labelled(tokenizer, corrupt)


def token_rows(inputs):
    """Each prompt's own token ids (padding dropped) of an encoded batch: what a caller
    checks (lengths, unknown tokens) without tokenising the text again."""
    ids = inputs["input_ids"] if hasattr(inputs, "items") else inputs
    mask = inputs.get("attention_mask") if hasattr(inputs, "items") else None
    if mask is None:
        return [row.tolist() for row in ids]
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def _labelled(tokenizer, inputs):
    """Token ids (a tensor or a dict) with their token strings attached."""
    out = TextInputs(inputs.items() if hasattr(inputs, "items") else {"input_ids": inputs})
    ids = out.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        out.tokens = token_strings(tokenizer, ids)
    return out


def right_pad_last(inputs):
    """Per-row index of the last real token when the batch is right-padded, else None."""
    mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool((mask[:, -1] != 0).all()):
        return None
    T = mask.shape[1]
    return T - 1 - (mask != 0).flip(1).long().argmax(1)


def generate_text(model, tokenizer, prompts, max_new_tokens=20, **generate_kwargs):
    """Continuations of text prompts (the new tokens only, decoded), greedy unless
    ``generate_kwargs`` say otherwise; prompts left-padded, as decoder-only
    generation needs."""
    from .blocks import model_device
    check_prompt_list(prompts, "prompts")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    inputs = encode(tokenizer, prompts, model_device(model), "prompts", side="left")
    inputs.pop("position_ids", None)  # generate counts positions from the mask itself
    if "attention_mask" not in inputs:  # pad == eos in many tokenizers: say there is none
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    kwargs.update(generate_kwargs)
    out = model.generate(**inputs, **kwargs)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                  skip_special_tokens=True)
