"""Finding residual-stream sites in Hugging Face models.

Site numbering (the same as ``output_hidden_states``): layer 0 is the embedding
output (the input of the first block), layer l in 1..L is the output of block l,
before any final norm. A site is (layer, position).
"""
import operator

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


def resolve_layers(model, layers, layers_path=None):
    """A sorted list of site layers, validated against 0..L; None means all."""
    n = num_sites_layers(model, layers_path)
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layers must be ints, got {layer!r}")
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} out of range: sites are 0 (embeddings) .. {n - 1} "
                             f"(output of the last block)")
        out.append(layer)
    if len(set(out)) != len(out):
        raise ValueError(f"layers has duplicates: {out}")
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


class ForwardInfo:
    """What a forward pass is about: batch, length, cache offset, padding.

    A pre-hook on the top-level model records, before each forward, the past
    length from the KV cache (a python int from the cache's shapes: no host
    sync) and the attention-mask columns of the new tokens.
    """

    def __init__(self, model):
        self.past = 0
        self.attention_mask = None
        self.shape = None
        self.calls = 0  # forwards seen: per-forward work is cached on it
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.shape = tuple(ids.shape[:2]) if ids is not None else None
        cache = kwargs.get("past_key_values")
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        elif isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            past = int(cache[0][0].shape[-2])  # legacy tuple cache
        self.past = past
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

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


class StopForward(Exception):
    """Raised by a capture hook once every requested layer is seen."""
