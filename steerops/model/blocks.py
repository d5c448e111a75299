"""Finding residual-stream sites in Hugging Face models.

Site numbering (the same as ``output_hidden_states``): layer 0 is the embedding
output (the input of the first block), layer l in 1..L is the output of block l,
before any final norm. A site is (layer, position).
"""
import gc
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


def resolve_layers(model, layers, layers_path=None, name="layers", count=None):
    """A list of site layers, validated against 0..L (or 0..count-1: blocks, for
    component sites); None means all."""
    n = num_sites_layers(model, layers_path) if count is None else count
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
            raise ValueError(
                f"layer {layer} out of range: sites are 0 (embeddings) .. {n - 1} (output of "
                f"the last block)" if count is None else
                f"{name}: block {layer} out of range: component sites are numbered by block, "
                f"0 .. {n - 1}")
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
