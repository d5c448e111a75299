"""Finding residual-stream sites in Hugging Face models.

Site numbering (the same as ``output_hidden_states``): layer 0 is the embedding
output (the input of the first block), layer l in 1..L is the output of block l,
before any final norm. A site is (layer, position).
"""
import gc
import inspect
import operator
import sys
import warnings
import weakref

import torch

# Where the block list lives, by architecture family; tried in order.
LAYER_PATHS = (
    "model.layers",                 # Llama, Mistral, Qwen2/3, Gemma/Gemma2, Phi-3 (CausalLM)
    "layers",                       # the same, base models (LlamaModel, ...)
    "transformer.h", "h",           # GPT-2, GPT-J
    "gpt_neox.layers",              # GPT-NeoX / Pythia
    "model.decoder.layers", "decoder.layers",  # OPT
    "encoder.layer",                # BertModel, RobertaModel
    "bert.encoder.layer", "roberta.encoder.layer",  # BERT/RoBERTa heads
    "model.language_model.layers", "language_model.model.layers",  # multimodal wrappers
    "transformer.layers",
)


class UnknownArchitectureError(ValueError):
    pass


def _get(model, path):
    try:
        return operator.attrgetter(path)(model)
    except AttributeError:
        return None


def find_layers(model, layers_path=None):
    """The model's list of blocks (an ``nn.ModuleList``).

    ``layers_path`` names it explicitly (e.g. ``"model.layers"``); otherwise
    the known paths are tried and an unknown architecture raises an error that
    lists them.
    """
    if layers_path is not None:
        found = _get(model, layers_path)
        if not isinstance(found, torch.nn.ModuleList):
            raise ValueError(f"layers_path {layers_path!r} does not name an nn.ModuleList on "
                             f"{type(model).__name__}")
        return found
    for path in LAYER_PATHS:
        found = _get(model, path)
        if isinstance(found, torch.nn.ModuleList) and len(found) > 0:
            return found
    raise UnknownArchitectureError(
        f"steerops cannot find the decoder/encoder blocks of {type(model).__name__}; tried "
        f"{', '.join(LAYER_PATHS)}. Pass layers_path='...' naming its nn.ModuleList of blocks.")


def model_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def layer_device(model, layer, layers_path=None):
    """The device site ``layer``'s hidden state lives on: the embedding output (site 0)
    is the first block's input, site l the output of block l. Under accelerate's
    device_map a block's execution device (its ``_hf_hook``) wins over where its
    weights sit (offloaded weights live on the CPU or disk)."""
    if layer == 0:
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        module = embed if isinstance(embed, torch.nn.Module) else \
            find_layers(model, layers_path)[0]
    else:
        module = find_layers(model, layers_path)[layer - 1]
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for p in module.parameters():
        return p.device
    return model_device(model)


def devices_used(model):
    """The distinct devices of the model's parameters (several under a device_map)."""
    return {p.device for p in model.parameters()}


def hidden_size(model):
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.shape[1]
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}")


def model_name(model):
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None) or \
        type(model).__name__


def num_sites_layers(model, layers_path=None):
    """L + 1: the number of residual-stream layers (0 = embeddings .. L)."""
    return len(find_layers(model, layers_path)) + 1


def resolve_layers(model, layers, layers_path=None, name="layers"):
    """A sorted list of site layers, validated against 0..L; None means all."""
    n = num_sites_layers(model, layers_path)
    if layers is None:
        return list(range(n))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"{name} must be an int, a list of ints or None (every layer), got "
                        f"{type(layers).__name__} {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"{name} is empty: give at least one layer in 0 .. {n - 1}, or None "
                         f"for every layer")
    out = []
    for layer in layers:
        if isinstance(layer, torch.Tensor) and layer.dim() == 0 and not layer.is_floating_point():
            layer = int(layer)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"{name} must be ints, got {layer!r}")
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} out of range: sites are 0 (embeddings) .. {n - 1} "
                             f"(output of the last block)")
        out.append(layer)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {out}")
    return out


def _hidden_from_call(args, kwargs):
    if args:
        return args[0]
    return kwargs["hidden_states"]


def _replace_hidden_in_call(args, kwargs, new):
    if args:
        return (new,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = new
    return args, kwargs


def _hidden_from_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden_in_output(output, new):
    if isinstance(output, tuple):
        return (new,) + output[1:]
    if isinstance(output, list):
        return [new] + output[1:]
    return new


def register_site_hook(model, layer, fn, layers_path=None):
    """Calls ``fn(hidden) -> None | Tensor`` on the residual stream at site layer
    ``layer``; a returned tensor replaces the hidden state. Returns the handle."""
    blocks = find_layers(model, layers_path)
    if layer == 0:
        def pre_hook(module, args, kwargs):
            new = fn(_hidden_from_call(args, kwargs))
            if new is None:
                return None
            return _replace_hidden_in_call(args, kwargs, new)
        return blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        new = fn(_hidden_from_output(output))
        if new is None:
            return None
        return _replace_hidden_in_output(output, new)
    return blocks[layer - 1].register_forward_hook(hook)


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

    def __init__(self, model):
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

    def remove(self):
        self._handle.remove()


# --------------------------------------------------------------------------- torch.compile

_compile_caches_cleared = False
_hook_guards_were_off = False
_checked_models = weakref.WeakSet()


def _compiled_wrappers(model):
    """torch.compile wrappers of ``model`` that exist now: the model itself if it
    is one, ``model.compile()``'s in-place form, or an ``OptimizedModule``
    elsewhere whose ``_orig_mod`` is this model (its instances found through
    their class: one scan of the heap, done once per model)."""
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        return [model]
    wrapper_type = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if wrapper_type is None:
        return []
    return [w for w in gc.get_referrers(wrapper_type)
            if isinstance(w, wrapper_type) and getattr(w, "_orig_mod", None) is model]


def make_hooks_visible_to_compile(model):
    """Module hooks added after a model was compiled are invisible to it:
    dynamo by default does not guard on hooks (``skip_nnmodule_hook_guards``),
    so the compiled code keeps running without (or, after a detach, with) the
    steering. steerops turns those guards on (attach/detach then recompiles)
    and, the first time it finds a model compiled while they were off, clears
    torch.compile's caches once (``torch.compiler.reset()``) with a warning,
    so the next call recompiles with the hooks in place."""
    global _compile_caches_cleared, _hook_guards_were_off
    if "torch._dynamo" not in sys.modules:
        return  # nothing was ever compiled in this process
    import torch._dynamo
    config = torch._dynamo.config
    if getattr(config, "skip_nnmodule_hook_guards", False):
        config.skip_nnmodule_hook_guards = False
        _hook_guards_were_off = True
    # a model compiled while the guards were off holds code that ignores hooks; one
    # checked once with the guards on can only be compiled with them from then on
    if not _hook_guards_were_off or _compile_caches_cleared or model in _checked_models:
        return
    try:
        _checked_models.add(model)
    except TypeError:
        pass
    if _compiled_wrappers(model):
        torch.compiler.reset()
        _compile_caches_cleared = True
        warnings.warn(
            f"steerops: this {type(model).__name__} was compiled with torch.compile while dynamo "
            f"did not guard on module hooks, so the compiled code would have ignored the "
            f"steering. steerops turned hook guards on and cleared torch.compile's caches once; "
            f"the next call recompiles with the steering in place.", stacklevel=3)


class StopForward(Exception):
    """Raised by a capture hook once every requested layer is seen."""


class eval_mode:
    """Runs ``model`` in eval mode for the duration, and says so when it was training.

    A model in train mode (``from_config`` returns one; GPT-2 has dropout 0.1)
    gives a different answer on every forward: two identical sweeps would
    differ. Measurements (caching, patching, attribution, learning a vector)
    switch dropout off for their forwards and restore the model's mode after.
    """

    def __init__(self, model, who):
        self.model, self.who, self.was_training = model, who, False

    def __enter__(self):
        self.was_training = bool(getattr(self.model, "training", False))
        if self.was_training:
            warnings.warn(
                f"steerops.{self.who}: the model is in train mode (dropout would make every "
                f"forward differ); it runs in eval mode for this call and is put back in train "
                f"mode after. Call model.eval() to silence this.", stacklevel=3)
            self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()
        return False
