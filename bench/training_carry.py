"""Trainings that outlive a machine. A deep or multitask model takes 8-18 hours of
CPU here, longer than a working session keeps its machine, and a machine's cache goes
with it. So the state a trainer saves every evaluation (``MODEL.resume.pt``: weights,
optimiser, schedule, data stream, curriculum stage) is copied into the repository's
``bench/training_states/SCALE`` and committed, and the next machine starts from it:

    python -m steerops.bench.train --scale deep --out DIR --save-progress   # trains nothing
    python -m steerops.bench.train --scale deep --out DIR --resume-from bench/training_states/deep

A state is only ever replaced by one further along, a finished model's state is
removed (the model itself is shipped: bench/ship.py), and a model a live trainer
holds is left alone. The trainer records the machines a model ran on when it moved
between kinds of CPU (pinned training is bit-exact on one kind only).
"""
import os
import shutil

import torch

from .model_store import checkpoint_name, claim_pid

STATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "training_states")


def states_dir(scale):
    """The repository's folder of ``scale``'s trainings in progress."""
    return os.path.join(STATES_DIR, scale)


def saved_step(path):
    """The step a saved training state reached (None when there is none)."""
    if not os.path.exists(path):
        return None
    return torch.load(path, weights_only=True, mmap=True)["step"]


def _copy(source, target):
    """Copies atomically: a reader never sees half a state."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(source, target + ".tmp")
    os.replace(target + ".tmp", target)


def _state_file(folder, name, scale, seed):
    return os.path.join(folder, checkpoint_name(name, scale, seed) + ".resume.pt")


def save_progress(out, folder, scale, models, trained):
    """Copies each of ``models`` ((name, seed) pairs)'s state from ``out`` into
    ``folder`` where it is further along, and removes from ``folder`` the state of a
    model that ``trained(name, seed)`` says ``out`` holds finished (under today's
    recipe). Returns one (name, seed, what happened) per model."""
    done = []
    for name, seed in models:
        state, kept = _state_file(out, name, scale, seed), _state_file(folder, name, scale, seed)
        if trained(name, seed) and not os.path.exists(state):
            if os.path.exists(kept):
                os.remove(kept)
                done.append((name, seed, "trained: its saved state removed"))
            continue
        step, before = saved_step(state), saved_step(kept)
        if step is None:
            done.append((name, seed, "nothing saved yet"))
        elif before is not None and before >= step:
            done.append((name, seed, f"kept (step {before}, here {step})"))
        else:
            _copy(state, kept)
            done.append((name, seed, f"saved at step {step}"))
    return done


def resume_from(folder, out, scale, models, trained):
    """Copies into ``out`` each of ``models``' states from ``folder`` that is further
    along than ``out``'s, unless ``out`` holds the model trained (``trained(name,
    seed)``) or a live trainer holds it. Returns one (name, seed, what happened) per
    model."""
    done = []
    for name, seed in models:
        kept, state = _state_file(folder, name, scale, seed), _state_file(out, name, scale, seed)
        path = os.path.join(out, checkpoint_name(name, scale, seed))
        step, here = saved_step(kept), saved_step(state)
        if step is None:
            continue
        if trained(name, seed) and here is None:
            done.append((name, seed, "already trained here"))
        elif claim_pid(path) not in (None, os.getpid()):
            done.append((name, seed, f"left alone: pid {claim_pid(path)} is training it"))
        elif here is not None and here >= step:
            done.append((name, seed, f"this folder's state is as far (step {here})"))
        else:
            _copy(kept, state)
            done.append((name, seed, f"resumes from step {step}"))
    return done
