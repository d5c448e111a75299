"""Where a forward stands in its prompt: the KV-cache offset of the tokens it carries
(under any cache keyword, or from cache_position / the attention mask / position ids),
and the prompt length that Steering's positions are counted against."""
import inspect

import torch

# keyword names under which models have carried a KV cache (HF 4.x: past_key_values,
# HF >= 5.24: cache; GPT-2 blocks: layer_past; Transformer-XL: mems)
CACHE_KEYWORDS = ("past_key_values", "cache", "past", "layer_past", "mems")


class DecodeOffsetError(ValueError):
    """The forward carries a cache whose length steerops cannot tell."""


def _is_cache_object(value):
    return hasattr(value, "get_seq_length") and callable(value.get_seq_length)


def _legacy_cache_length(value):
    """Length of a legacy tuple cache ((k, v) per layer, k: (B, H, T, d)), or None."""
    if isinstance(value, (tuple, list)):
        if len(value) == 0:
            return 0
        first = value[0]
        if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor):
            return int(first[0].shape[-2])
    return None


def decode_offset(kwargs, new_tokens):
    """How many tokens precede this forward's first token (the KV-cache length).

    Read from whatever the call carries, in order of reliability: a cache
    object under any keyword (``get_seq_length``; Python ints, no host sync),
    a legacy tuple cache, ``cache_position``, a 2-D attention mask longer than
    the new tokens, ``position_ids``. A call with no cache at all starts at 0.
    A cache that none of these can measure raises :class:`DecodeOffsetError`:
    guessing 0 would steer the wrong tokens without a word.
    """
    unknown = None
    for name, value in kwargs.items():
        if value is None or name == "use_cache":
            continue
        if _is_cache_object(value):
            return int(value.get_seq_length())
        if name in CACHE_KEYWORDS:
            length = _legacy_cache_length(value)
            if length is not None:
                return length
            unknown = name
    if unknown is None:
        return 0  # no cache: the forward sees the whole sequence from column 0
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= new_tokens:
        return int(mask.shape[1] - new_tokens)
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.numel():
        return int(position_ids.reshape(-1, position_ids.shape[-1])[:, 0].max())
    raise DecodeOffsetError(
        f"the model was called with a {unknown}={type(kwargs[unknown]).__name__} that steerops "
        f"cannot measure (no get_seq_length(), not a tuple of (key, value) tensors), and no "
        f"cache_position, 2-D attention_mask or position_ids to take the offset from; "
        f"positions would be guessed. Pass attention_mask or cache_position with the call.")


class ForwardInfo:
    """What a forward pass is about: batch, length, decode offset, padding, prompt.

    A pre-hook on the top-level model records, before each forward, the decode
    offset (see :func:`decode_offset`), the attention-mask columns of the new
    tokens and where the current prompt ends. A forward with offset 0 starts a
    new prompt unless it extends the previous forward's tokens (generation
    without a cache re-runs the whole sequence each step).
    """

    def __init__(self, model, track_prompt=True):
        self.track_prompt = track_prompt  # False: only shape and mask (the fast path)
        self.past = 0
        self.attention_mask = None
        self.shape = None
        self.prompt_len = None
        self.calls = 0  # forwards seen: per-forward work is cached on it
        self._tokens = None
        try:
            self._signature = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._signature = None
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _arguments(self, args, kwargs):
        if len(args) > 1 and self._signature is not None:
            try:
                return dict(self._signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        out = dict(kwargs)
        if args and "input_ids" not in out:
            out["input_ids"] = args[0]
        return out

    def _record(self, module, args, kwargs):
        self.calls += 1
        if not self.track_prompt:  # steering every position: no offset or prompt needed
            tokens = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            self.shape = tuple(tokens.shape[:2]) if isinstance(tokens, torch.Tensor) else None
            mask = kwargs.get("attention_mask")
            if mask is None and len(args) > 1:
                mask = self._arguments(args, kwargs).get("attention_mask")
            self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 \
                else None
            return
        call = self._arguments(args, kwargs)
        tokens = call.get("input_ids")
        if tokens is None:
            tokens = call.get("inputs_embeds")
        self.shape = tuple(tokens.shape[:2]) if isinstance(tokens, torch.Tensor) else None
        T = self.shape[1] if self.shape else 0
        self.past = decode_offset(call, T)
        mask = call.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if self.prompt_len is None or (self.past == 0 and not self._extends(tokens)):
            self.prompt_len = self.past + T
        self._tokens = tokens if self.past == 0 else None

    def _extends(self, tokens):
        """True when ``tokens`` is the previous uncached forward's tokens plus one:
        a step of generation without a cache (one new token per step); a longer
        extension is a new prompt (e.g. generating on from an earlier output)."""
        prev = self._tokens
        if not isinstance(tokens, torch.Tensor) or not isinstance(prev, torch.Tensor):
            return False
        if tokens.shape[0] != prev.shape[0] or tokens.shape[1] != prev.shape[1] + 1 or \
                tokens.shape[2:] != prev.shape[2:] or tokens.device != prev.device:
            return False
        return bool(torch.equal(tokens[:, :prev.shape[1]], prev))

    def reset(self):
        """The next forward starts a new prompt."""
        self.prompt_len = None
        self._tokens = None

    def current(self, hidden):
        """(past, new-token attention mask (B, T) or None) for this hidden state."""
        B, T = hidden.shape[:2]
        if self.shape != (B, T):  # a call that bypassed the top-level model
            return 0, None
        mask = self.attention_mask
        if mask is not None:
            mask = mask[:, self.past:self.past + T]
            if mask.shape[1] != T:
                mask = None
        return self.past, mask

    def new_token_mask(self, hidden):
        """The attention-mask columns of this forward's tokens (the last T: a mask
        covers the cached tokens and the new ones), or None."""
        mask = self.attention_mask
        T = hidden.shape[1]
        if mask is None or self.shape != tuple(hidden.shape[:2]) or mask.shape[1] < T:
            return None
        return mask[:, -T:]

    def remove(self):
        self._handle.remove()
