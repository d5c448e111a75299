"""The task models' architecture and checkpoint files: the config every scale starts
from, building a model, where checkpoints live (the shipped toy ones, the cache for the
trained scales), saving and loading them with their training record, whether a cached one is what a
recipe trains today, the trainers' claims on them (``NAME.training``: the pid training
it), and the hash that says which weights a result came from. Training is
bench/train.py."""
import json
import os

import torch

from .tasks import VOCAB

CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
MODEL_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                    max_position_embeddings=16, tie_word_embeddings=False, bos_token_id=1,
                    eos_token_id=1, pad_token_id=0)
# the cache folder of the trained scales: bump when the config, tasks or recipe change
STANDARD_VERSION = "standard-v4"


def cache_dir():
    """Where on-demand checkpoints live: $STEEROPS_CACHE, else ~/.cache/steerops."""
    root = os.environ.get("STEEROPS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "steerops")
    return os.path.join(root, "checkpoints", STANDARD_VERSION)


def checkpoint_name(task_name, scale="toy", seed=0):
    return f"{task_name}.safetensors" if scale == "toy" else f"{task_name}-seed{seed}.safetensors"


def build_model(config=None):
    import transformers as T
    cfg = T.LlamaConfig(**(config or MODEL_CONFIG))
    return T.LlamaForCausalLM(cfg)


def save_checkpoint(model, info, path):
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = dict(info, torch=torch.__version__)
    meta.setdefault("config", MODEL_CONFIG)
    tmp = path + ".tmp"
    save_file(state, tmp, metadata={"steerops": json.dumps(meta)})
    os.replace(tmp, path)  # a killed run never leaves a half-written checkpoint


def weights_sha256(path):
    """sha256 of a checkpoint file: which weights a result came from."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_info(path):
    """A checkpoint's metadata (config, seed, recipe, steps, held-out accuracy)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["steerops"])


def load_checkpoint(task_name, directory=CHECKPOINT_DIR, device="cpu", scale="toy", seed=0):
    """(model, info) for a shipped (or freshly trained) task checkpoint."""
    from safetensors.torch import load_file
    path = checkpoint_path(task_name, scale, seed, directory)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint for task {task_name!r} at {path}; train it with "
                                f"python -m steerops.bench.train --tasks {task_name}"
                                + ("" if scale == "toy" else f" --scale {scale} --seeds {seed}"))
    info = read_info(path)
    info["weights_sha256"] = weights_sha256(path)
    model = build_model(info["config"])
    # a shipped fp16 file loads into the float32 model exactly (every fp16 is a float32)
    model.load_state_dict(load_file(path))
    return model.to(device).eval(), info


def shipped_dir(scale):
    """The repository's own models of a scale: the toy ones at the top of
    bench/checkpoints, a trained scale's in bench/checkpoints/SCALE (fp16 files written by
    bench/ship.py: the stored weights are the models, docs/protocol.md)."""
    return CHECKPOINT_DIR if scale == "toy" else os.path.join(CHECKPOINT_DIR, scale)


def checkpoint_path(task_name, scale="toy", seed=0, directory=None):
    """Where the checkpoint lives: ``directory`` when given; else the shipped model when
    the repository has it (always for toy), else the cache (trained on first use)."""
    name = checkpoint_name(task_name, scale, seed)
    if directory is None:
        if scale != "toy":
            return shipped_model(task_name, scale, seed) or os.path.join(cache_dir(), name)
        directory = shipped_dir(scale)
    return os.path.join(directory, name)


def shipped_model(task_name, scale, seed):
    """The path of the repository's model of ``task_name``, ``scale`` and ``seed`` (a
    trained scale's, bench/checkpoints/SCALE), or None: a trainer leaves it be, since the
    benchmark loads it before any trained copy."""
    if scale == "toy":  # the toy models are the shipped defaults, retrained on request
        return None
    path = os.path.join(shipped_dir(scale), checkpoint_name(task_name, scale, seed))
    return path if os.path.exists(path) else None


def is_shipped(path):
    """Whether ``path`` is one of the repository's models (never retrained or removed)."""
    return os.path.abspath(os.path.dirname(path)).startswith(os.path.abspath(CHECKPOINT_DIR))


def same_training(info, wanted):
    """Whether a cached checkpoint is what ``wanted`` (a recipe) trains today.

    Training is deterministic and stops at the accuracy target, so a model that
    stopped at step s before its budget is also what any budget >= s gives; one
    that ran out of budget is only the same under the same budget. Checkpoints
    from before the budget was recorded ran under standard-v1's 2500."""
    for key, default in (("lr", None), ("batch_pairs", None), ("target", 0.99),
                         ("decay", False), ("curriculum", None), ("multihop_share", None),
                         ("compiled", False)):
        if info.get(key, default) != wanted.get(key, default):
            return False
    budget = info.get("max_steps", 2500)
    if info["steps"] < budget:
        return info["steps"] <= wanted["max_steps"]
    return budget == wanted["max_steps"]


def claim_pid(path):
    """The pid of the live process holding ``path``'s training claim, else None."""
    try:
        with open(path + ".training") as f:
            pid = int(f.read().strip() or 0)
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None
