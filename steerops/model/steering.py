"""Steering Hugging Face models during forward and generate."""
import math
import numbers

import torch

from .. import ops
from ..ops import validation
from ..ops.backend import unchecked
from .blocks import (hidden_size, layer_device, make_hooks_visible_to_compile, model_device,
                     register_site_hook, resolve_layers)
from .decode import ForwardInfo
from .positions import SteeredPositions


class Steering:
    """Applies the fused steering op to the residual stream at one or more layers.

    Args:
        model: a Hugging Face model (or any model whose blocks steerops finds).
        layer: site layer(s): 0 = embedding output, l = output of block l.
        vector: (D,) or (K, D) tensor, a dict {layer: vector} for different
            vectors per layer, or a :class:`~steerops.SteeringVector` (which
            carries its layer(s): pass ``layer=None`` or the same layers).
        alpha: float, 0-d tensor, or (B,) tensor (one strength per batch row).
            May require grad (the op's backward is used).
        mode: 'add', 'norm_scaled', 'ablate' or 'clamp' (see ``steerops.steer``).
        positions: 'all', 'prompt' (the tokens of a forward that starts a new
            prompt: the prompt under ``generate``), 'generated' (every later
            token), explicit prompt positions (int or list; column indices in
            the prompt, negative ones count back from its end, -1 = last
            prompt token; a position outside the prompt is an error), or a
            bool (batch, seq) mask over absolute positions (prompt and
            generated tokens).
            Positions stay correct under the KV cache; padding tokens
            (attention_mask == 0) are never steered.
        vector_index: (B,) integer, the vector row of each batch row (K > 1).
        layers_path: the dotted path of the model's block list, if not found.

    Use as a context manager (``with Steering(...): model.generate(...)``) or
    with :meth:`attach` / :meth:`detach`. The plan is validated once when
    attached; the per-forward work is building the row mask (a few tiny
    tensor ops, no host sync) and one fused kernel per steered layer, in place
    unless gradients are needed.
    """

    def __init__(self, model, layer, vector, alpha=1.0, *, mode="add", positions="all",
                 vector_index=None, layers_path=None):
        validation.check_mode(mode)
        self.model = model
        self.mode = mode
        self.layers_path = layers_path
        if hasattr(vector, "per_layer"):  # a SteeringVector carries its layer(s)
            vector.check_model(model)
            if layer is not None and sorted(resolve_layers(model, layer, layers_path)) != \
                    sorted(vector.layers):
                raise ValueError(f"this SteeringVector is for layer(s) {vector.layers}, "
                                 f"not {layer}")
            vector = vector.per_layer()
        layers = sorted(vector.keys()) if isinstance(vector, dict) else layer
        if layers is None:
            raise ValueError("layer is None: give the layer(s) to steer (or a SteeringVector, "
                             "which carries its own)")
        self.layers = resolve_layers(model, layers, layers_path, name="layer")
        D = hidden_size(model)
        device = model_device(model)
        self.vectors = {}
        for l in self.layers:  # each layer's vector on that layer's device (device_map)
            v = vector[l] if isinstance(vector, dict) else vector
            self.vectors[l] = self._check_vector(v, D, layer_device(model, l, layers_path))
        K = max(v.shape[0] if v.dim() == 2 else 1 for v in self.vectors.values())
        self.vector_index = self._check_vector_index(vector_index, K, device)
        self.alpha = self._check_alpha(alpha, device)
        self._positions = SteeredPositions(positions, device)
        self.positions = self._positions.value
        self._handles = []
        self._info = None
        self._rows_cache = (None, None)
        self._fast = {}  # (device, batch, alpha, vector) -> alpha * v (the fast path)
        self._depth = 0  # nested `with` blocks on this object: detach when the outermost exits

    # ------------------------------------------------------------------ validation (once)
    def _check_vector(self, v, D, device):
        """The ops' own vector checks, run once here rather than on every forward."""
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError(f"vector must be a floating tensor, got {type(v).__name__}")
        checks = validation.ValueChecks()
        checks.enabled = True  # once per Steering, also under steerops.unchecked()
        validation.vector_arg(v, D, None, self.mode, checks,
                     model_note=f" for this model (hidden size {D})")
        checks.run()
        return v.to(device)

    @staticmethod
    def _check_vector_index(vector_index, K, device):
        if vector_index is None:
            if K > 1:
                raise ValueError(f"vector has {K} rows, so vector_index (one row per batch "
                                 f"element) is required")
            return None
        vi = torch.as_tensor(vector_index, device=device)
        if vi.dim() != 1 or vi.is_floating_point() or vi.dtype == torch.bool:
            raise ValueError("vector_index must be a 1-D integer tensor (one per batch row)")
        if vi.numel() and (int(vi.min()) < 0 or int(vi.max()) >= K):
            raise ValueError(f"vector_index values must be in [0, {K})")
        return vi.long()

    @staticmethod
    def _check_alpha(alpha, device):
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
            if not math.isfinite(float(alpha)):
                raise ValueError(f"alpha must be finite, got {alpha}")
            return float(alpha)
        if isinstance(alpha, torch.Tensor) and alpha.is_floating_point() and alpha.dim() <= 1:
            if alpha.device.type == "meta" or not bool(torch.isfinite(alpha.detach()).all()):
                raise ValueError("alpha has NaN or Inf entries (or is on the meta device)")
            return alpha.to(device)
        raise TypeError("alpha must be a float, a 0-d tensor or a (batch,) floating tensor")

    # ------------------------------------------------------------------ per forward
    def _row_args(self, hidden):
        """(mask, vector_index, alpha) rows for this forward, on ``hidden``'s device:
        built once per forward, moved once per device (device_map: layers differ)."""
        key = (self._info.calls if self._info else None, tuple(hidden.shape[:2]))
        if self._rows_cache[0] != key:
            self._rows_cache = (key, {})
        per_device = self._rows_cache[1]
        if hidden.device not in per_device:
            built = next(iter(per_device.values()), None) or self._build_row_args(hidden)
            per_device[hidden.device] = tuple(
                x.to(hidden.device) if isinstance(x, torch.Tensor) else x for x in built)
        return per_device[hidden.device]

    def _build_row_args(self, hidden):
        B, T = hidden.shape[:2]
        if self._positions.steers_everything:  # only padding is left out
            sel, attn = None, self._info.new_token_mask(hidden)
        else:
            past, attn = self._info.current(hidden)
            sel = self._positions.mask(B, T, past, self._info.prompt_len, hidden.device)
        if attn is not None:
            keep = attn != 0
            sel = keep if sel is None else sel & keep
        mask = None if sel is None else sel.expand(B, T)
        vi = alpha = None
        if self.vector_index is not None:
            if self.vector_index.shape[0] != B:
                raise ValueError(f"vector_index has {self.vector_index.shape[0]} entries, "
                                 f"batch has {B} rows")
            vi = self.vector_index.unsqueeze(1).expand(B, T)
        alpha = self.alpha
        if isinstance(alpha, torch.Tensor) and alpha.dim() == 1:
            if alpha.shape[0] != B:
                raise ValueError(f"alpha has {alpha.shape[0]} entries, batch has {B} rows")
            alpha = alpha.unsqueeze(1).expand(B, T)
        return mask, vi, alpha

    def _fast_delta(self, layer, hidden):
        """alpha * v for the fast path, built once per (device, batch) and kept:
        (D,) or (B, 1, D) fp32, the steering term of mode 'add' with no row mask."""
        alpha, vector = self.alpha, self.vectors[layer]
        key = (hidden.device, hidden.shape[0], id(alpha), id(vector))
        delta = self._fast.get(key)
        if delta is None:
            v = vector.detach().to(hidden.device, torch.float32).reshape(-1)
            if isinstance(alpha, torch.Tensor):
                a = alpha.detach().to(hidden.device, torch.float32)
                if a.dim() == 1 and a.shape[0] != hidden.shape[0]:
                    return None  # the general path reports the mismatch
                delta = a.reshape(-1, 1, 1) * v if a.dim() == 1 else a * v
            else:
                delta = alpha * v
            self._fast[key] = delta
        return delta

    def _fast_path_applies(self, layer):
        """'add' of one vector at every position with a fixed alpha: the steering term
        is the same for every forward of a generate, so it is computed once, and each
        forward adds it in place (one op; the attention mask's padding columns masked)."""
        alpha, vector = self.alpha, self.vectors[layer]
        return (self.mode == "add" and layer != 0 and self.vector_index is None
                and self._positions.steers_everything
                and (vector.dim() == 1 or vector.shape[0] == 1) and not vector.requires_grad
                and not (isinstance(alpha, torch.Tensor) and alpha.requires_grad))

    def _make_hook(self, layer):
        vector = self.vectors[layer]
        fast = self._fast_path_applies(layer)

        def steer_site(hidden):
            nonlocal vector
            if fast and not (torch.is_grad_enabled() and hidden.requires_grad):
                delta = self._fast_delta(layer, hidden)
                if delta is not None:
                    keep = self._info.new_token_mask(hidden) if self._info is not None else None
                    hidden.add_(delta if keep is None else delta * (keep != 0)[..., None])
                    return None
            mask, vi, alpha = self._row_args(hidden)
            v = vector
            if v.device != hidden.device:  # a hidden state off its layer's weights' device
                v = v.to(hidden.device)    # (a trained vector moves per call: stays live)
                if not vector.requires_grad:
                    vector = self.vectors[layer] = v
            needs_grad = torch.is_grad_enabled() and (
                hidden.requires_grad or v.requires_grad
                or (isinstance(alpha, torch.Tensor) and alpha.requires_grad))
            with unchecked():  # validated once in __init__
                if needs_grad or layer == 0:  # layer 0: never write into the caller's embeds
                    return ops.steer(hidden, v, alpha, mode=self.mode, mask=mask,
                                     vector_index=vi)
                ops.steer_(hidden, v, alpha, mode=self.mode, mask=mask, vector_index=vi)
            return None
        return steer_site

    # ------------------------------------------------------------------ text
    def generate(self, prompts, tokenizer, max_new_tokens=20, **generate_kwargs):
        """Steered continuations of text prompts: a list with one string per prompt
        (the new tokens only, decoded). Prompts of different lengths are padded on
        the left, as decoder-only generation needs; greedy unless ``generate_kwargs``
        say otherwise. A per-row ``alpha`` (B,) gives each prompt its own strength."""
        from .text import generate_text
        with self:
            return generate_text(self.model, tokenizer, prompts, max_new_tokens,
                                 **generate_kwargs)

    # ------------------------------------------------------------------ lifecycle
    def attach(self):
        if self._handles:
            return self
        make_hooks_visible_to_compile(self.model)
        # steering every position needs no decode offset or prompt bookkeeping per
        # forward, only the attention mask
        self._info = ForwardInfo(self.model,
                                 track_prompt=not self._positions.steers_everything)
        for layer in self.layers:
            self._handles.append(register_site_hook(self.model, layer, self._make_hook(layer),
                                                    self.layers_path))
        return self

    def detach(self):
        """Removes the hooks (whatever the number of open ``with`` blocks)."""
        self._depth = 0
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._info is not None:
            self._info.remove()
            self._info = None
        self._rows_cache = (None, None)

    def reset(self):
        """Forget the prompt length: the next forward is a new prompt. Rarely
        needed: a forward with no cached tokens that does not extend the
        previous one by a token already starts a new prompt."""
        if self._info is not None:
            self._info.reset()

    def __enter__(self):
        # re-entering the same object (``with s:`` inside ``with s:``) keeps one set of
        # hooks; only the outermost block's exit removes them
        self.attach()
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth <= 0:
            self.detach()
        return False

