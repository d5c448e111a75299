"""Steering vectors: learning from contrastive pairs, and storage."""
import json
from dataclasses import dataclass, field

import torch

from .blocks import eval_mode, hidden_size, model_device, model_name, resolve_layers
from .caching import cache_activations
from .inputs import as_inputs, model_output
from .metrics import as_metric
from .steering import Steering

METHODS = ("mean_diff", "pca", "optimize")


@dataclass
class SteeringVector:
    """A steering vector with what it takes to use it correctly.

    ``vector`` is (D,) or (K, D) for one ``layer`` (the site layer it was read
    at: 0 = embeddings, l = output of block l), or (len(layer), D) when
    ``layer`` is a list (one vector per layer); ``settings`` records how it was
    learned.
    """
    vector: torch.Tensor
    layer: int
    hidden_size: int
    model_name: str = None
    method: str = "mean_diff"
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.layer, (list, tuple)):
            self.layer = [int(l) for l in self.layer]
            if self.vector.dim() != 2 or self.vector.shape[0] != len(self.layer):
                raise ValueError(f"a SteeringVector for layers {self.layer} needs a vector of "
                                 f"shape ({len(self.layer)}, D), got {tuple(self.vector.shape)}")

    @property
    def layers(self):
        return list(self.layer) if isinstance(self.layer, list) else [self.layer]

    def per_layer(self):
        """{layer: vector} (the form ``Steering`` takes for several layers)."""
        if isinstance(self.layer, list):
            return {l: self.vector[i] for i, l in enumerate(self.layer)}
        return {self.layer: self.vector}

    def check_model(self, model):
        D = hidden_size(model)
        if D != self.hidden_size:
            raise ValueError(f"this steering vector is for hidden size {self.hidden_size} "
                             f"(model {self.model_name!r}); the model has hidden size {D}")

    def steer(self, model, alpha=1.0, **kwargs):
        """A :class:`~steerops.Steering` of ``model`` with this vector at its layer(s)."""
        self.check_model(model)
        return Steering(model, None, self.per_layer(), alpha, **kwargs)

    def save(self, path):
        """safetensors file with the tensor; the metadata as JSON in its header."""
        from safetensors.torch import save_file
        meta = {"layer": self.layer, "hidden_size": self.hidden_size,
                "model_name": self.model_name, "method": self.method, "settings": self.settings,
                "format": "steerops.SteeringVector/1"}
        save_file({"vector": self.vector.detach().cpu().contiguous()}, str(path),
                  metadata={"steerops": json.dumps(meta)})

    @classmethod
    def load(cls, path, device=None):
        """Loads a file written by :meth:`save`; a file that is missing, not a steerops
        vector, truncated or corrupted (non-finite values) is a ValueError naming it."""
        import os

        from safetensors import safe_open
        path = str(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"SteeringVector.load: no such file: {path}")
        if os.path.isdir(path):
            raise ValueError(f"SteeringVector.load: {path} is a folder; give the .safetensors "
                             f"file written by SteeringVector.save")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                if "steerops" not in header:
                    raise ValueError(f"{path} is not a steerops steering vector (no steerops "
                                     f"metadata)")
                meta = json.loads(header["steerops"])
                vector = f.get_tensor("vector")
        except ValueError:
            raise
        except Exception as e:  # safetensors' own errors (truncated, bad header) name no file
            raise ValueError(f"SteeringVector.load: {path} is not a readable safetensors file "
                             f"(truncated or corrupted?): {e}") from None
        missing = ([k for k in ("layer", "hidden_size") if k not in meta]
                   if isinstance(meta, dict) else [])
        if missing or not isinstance(meta, dict):
            raise ValueError(f"SteeringVector.load: {path} has steerops metadata without "
                             f"{', '.join(missing) or 'a record'}; it was not written by "
                             f"SteeringVector.save")
        if not vector.is_floating_point() or not bool(torch.isfinite(vector).all()):
            raise ValueError(f"SteeringVector.load: {path} holds non-finite (NaN/Inf) or "
                             f"non-floating values: the file's data is corrupted")
        if vector.shape[-1] != meta["hidden_size"]:
            raise ValueError(f"SteeringVector.load: {path}: the vector is {vector.shape[-1]} "
                             f"wide but its metadata says hidden_size {meta['hidden_size']}: "
                             f"the file's data and record disagree")
        if device is not None:
            vector = vector.to(device)
        return cls(vector, meta["layer"], meta["hidden_size"], meta.get("model_name"),
                   meta.get("method", "unknown"), meta.get("settings", {}))


def contrastive_differences(model, positive, negative, layer, position=-1, layers_path=None):
    """h(positive) - h(negative) at (layer, position) per pair: (pairs, D) float32."""
    pos = cache_activations(model, positive, [layer], [position], layers_path=layers_path)
    neg = cache_activations(model, negative, [layer], [position], layers_path=layers_path)
    if pos.acts.shape != neg.acts.shape:
        raise ValueError("positive and negative must have the same number of pairs")
    return (pos[layer][:, 0] - neg[layer][:, 0]).float()


def learn_steering_vector(model, positive, negative=None, layer=None, *, method="mean_diff",
                          position=-1, metric=None, mode="add", alpha=1.0, steps=50, lr=0.05,
                          weight_decay=0.0, steer_positions="all", layers_path=None,
                          progress=False, tokenizer=None):
    """Learn a steering vector at ``layer`` from contrastive prompt pairs.

    Methods:
        mean_diff: mean over pairs of h(positive) - h(negative) at ``position``.
        pca: the first principal direction of those (uncentred) differences,
            signed to agree with their mean and scaled to the mean projection.
        optimize: gradient ascent on ``metric(logits, pair_index)`` of the
            *negative* prompts steered at ``layer`` (``mode``, ``alpha``,
            ``steer_positions``), starting from mean_diff; gradients flow through
            the fused steering op's backward. Adam, ``steps`` full-batch steps,
            optional L2 ``weight_decay`` on the vector.

    ``positive`` / ``negative`` may be text (lists of strings) with ``tokenizer``;
    prompts of different lengths are padded on the left when ``position`` counts
    from the end (the default -1: every prompt's last token), else on the
    tokenizer's side. ``positive`` may instead be a :class:`~steerops.PromptPairs`
    (``negative`` and ``metric`` None): its clean prompts are the positive set, its
    corrupt ones the negative set, its metric the one ``optimize`` ascends; nothing is
    tokenised again.
    """
    positive, negative, metric, bound = _contrastive_sets(positive, negative, metric,
                                                          position)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int (one site layer), got {layer!r}")
    resolve_layers(model, [layer], layers_path, name="layer")
    from .text import prompt_inputs
    side = "left" if isinstance(position, int) and position < 0 else None
    device = model_device(model)
    positive = prompt_inputs(model, tokenizer, positive, device, "positive", side)
    negative = prompt_inputs(model, tokenizer, negative, device, "negative", side)
    if metric is not None and not bound:
        from .metrics import bind_metric
        metric = bind_metric(metric, tokenizer)
    with eval_mode(model, "learn_steering_vector"):
        return _learn(model, positive, negative, layer, method=method, position=position,
                      metric=metric, mode=mode, alpha=alpha, steps=steps, lr=lr,
                      weight_decay=weight_decay, steer_positions=steer_positions,
                      layers_path=layers_path, progress=progress)


def _contrastive_sets(positive, negative, metric, position):
    """(positive, negative, metric, whether the metric is bound already) of a call: as
    given, or from a PromptPairs (its metric's answers resolved when it was built)."""
    from .pairs import PromptPairs
    if not isinstance(positive, PromptPairs):
        if negative is None:
            raise TypeError("negative is required unless positive is a PromptPairs")
        return positive, negative, metric, False
    if negative is not None or metric is not None:
        raise TypeError("positive is a PromptPairs, which holds the negative (corrupt) prompts "
                        "and the metric: pass negative=None and metric=None")
    from .text import right_pad_last
    if isinstance(position, int) and position < 0 and \
            right_pad_last(positive.clean) is not None:
        raise ValueError(f"position {position}: these PromptPairs are padded on the right, so "
                         f"a position counted from the end would read padding for the shorter "
                         f"prompts; build them with tokenizer.padding_side = 'left', or give a "
                         f"position from the start")
    return positive.clean, positive.corrupt, positive.metric, True


def _learn(model, positive, negative, layer, *, method, position, metric, mode, alpha, steps,
           lr, weight_decay, steer_positions, layers_path, progress):
    diffs = contrastive_differences(model, positive, negative, layer, position, layers_path)
    if not bool(diffs.any()):
        raise ValueError(
            f"positive and negative give identical activations at layer {layer}, position "
            f"{position} in every pair: the steering vector would be zero. Pass pairs that "
            f"differ before that position.")
    mean = diffs.mean(0)
    settings = {"position": position, "pairs": int(diffs.shape[0])}
    if method == "mean_diff":
        vector = mean
    elif method == "pca":
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        u = vh[0]
        if torch.dot(u, mean) < 0:
            u = -u
        vector = u * (diffs @ u).mean()
        settings["explained"] = float((diffs @ u).pow(2).sum() / diffs.pow(2).sum())
    else:
        if metric is None:
            raise ValueError("method 'optimize' needs a metric(logits, pair_index) to maximise")
        vector, history = optimize_vector(model, negative, layer, mean, metric, mode=mode,
                                          alpha=alpha, steps=steps, lr=lr,
                                          weight_decay=weight_decay, positions=steer_positions,
                                          layers_path=layers_path, progress=progress)
        settings.update(mode=mode, alpha=alpha, steps=steps, lr=lr, weight_decay=weight_decay,
                        steer_positions=steer_positions if isinstance(steer_positions, str)
                        else list(map(int, steer_positions)), metric_history=history)
    return SteeringVector(vector.detach(), layer, hidden_size(model), model_name(model), method,
                          settings)


def optimize_vector(model, inputs, layer, init, metric, *, mode="add", alpha=1.0, steps=50,
                    lr=0.05, weight_decay=0.0, positions="all", layers_path=None,
                    progress=False):
    """Gradient ascent of ``metric(logits, pair_index)`` on ``inputs`` steered at
    ``layer`` by a vector starting at ``init``; gradients reach the vector
    through the fused steering op's backward (none reach the model).
    Returns (vector, metric history)."""
    from tqdm.auto import tqdm

    metric = as_metric(metric)
    negative = inputs
    device = init.device
    inputs = as_inputs(negative, model_device(model))
    n = next(iter(inputs.values())).shape[0]
    pair_index = torch.arange(n, device=device)
    v = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    history = []
    steering = Steering(model, layer, v, alpha, mode=mode, positions=positions,
                        layers_path=layers_path)
    with steering, torch.enable_grad():
        for step in tqdm(range(steps), disable=not progress, desc="optimising vector"):
            steering.reset()
            m = metric(model_output(model(**inputs)), pair_index).float().mean()
            if not bool(torch.isfinite(m)):
                raise ValueError(f"metric is NaN or Inf at optimisation step {step} (mean over "
                                 f"the pairs {float(m.detach())}); the vector would be NaN. Use a "
                                 f"metric that stays finite, or a smaller lr / alpha.")
            loss = -m + weight_decay * v.pow(2).sum()
            (grad,) = torch.autograd.grad(loss, [v])  # no gradients into the model
            opt.zero_grad()
            v.grad = grad
            opt.step()
            if not bool(torch.isfinite(v.detach()).all()):
                raise ValueError(f"the vector became NaN or Inf at optimisation step {step} "
                                 f"(lr={lr}); use a smaller lr")
            history.append(float(m.detach()))
    return v, history
