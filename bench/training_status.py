"""Where a folder's task-model trainings stand, for runs that take hours in the
background (``python -m steerops.bench.train --scale deep --out DIR --status``).

Per model: trained (steps, held-out accuracy, time, the 95% rule), training now or
stopped mid-way (the last saved step, the curriculum stage, the last held-out accuracy,
the pace), or not started. It reads the checkpoints, the resumable states and the
trainers' claims, and trains nothing.
"""
import dataclasses
import json
import os

import torch

from .model_store import checkpoint_name, claim_pid, read_info, same_training, shipped_model
from .scales import (MIN_ACCURACY, SCALES, plan_settings, task_accuracy, task_for,
                     training_stages)
from .trainer import TrainingPlan, resume_identity

@dataclasses.dataclass
class ModelStatus:
    """One model's training, as ``model_status`` finds it. ``state``: "shipped",
    "trained", "training", "stopped", "not started" or "other recipe"."""
    task: str
    seed: int
    state: str
    step: int = None
    budget: int = None
    held_out: float = None
    seconds: float = None
    stages: str = ""
    note: str = ""

    def row(self):
        """The table row: task, seed, state, step/budget, stage, held-out, time, note."""
        step = "" if self.step is None else f"{self.step}/{self.budget}"
        held = "" if self.held_out is None else f"{self.held_out:.3f}"
        return [self.task, str(self.seed), self.state, step, self.stages, held,
                _hours(self.seconds), self.note]


def model_status(task_name, scale, seed, directory, max_steps=None):
    """Where the training of ``task_name``'s ``seed`` model of ``scale`` stands in
    ``directory`` (``max_steps``: the budget the trainer was given, else the recipe's)."""
    path = os.path.join(directory, checkpoint_name(task_name, scale, seed))
    settings = plan_settings(task_name, scale, seed, max_steps)
    shipped = shipped_model(task_name, scale, seed)
    if shipped:  # the repository's model: no trainer trains it again
        info = read_info(shipped)
        return ModelStatus(task_name, seed, "shipped", info["steps"], info.get("max_steps"),
                           info["held_out_accuracy"], info.get("train_seconds"),
                           note=_excluded(info, scale) + "; in the repository")
    pid, resume = claim_pid(path), path + ".resume.pt"
    if os.path.exists(resume):
        return _resumable(task_name, scale, seed, resume, settings, pid)
    if os.path.exists(path):
        info = read_info(path)
        if not same_training(info, settings):
            return ModelStatus(task_name, seed, "other recipe", note="retrained on the next run")
        return ModelStatus(task_name, seed, "trained", info["steps"], info.get("max_steps"),
                           info["held_out_accuracy"], info.get("train_seconds"),
                           note=_excluded(info, scale))
    if pid:
        return ModelStatus(task_name, seed, "training", note=f"pid {pid}, before its first save")
    return ModelStatus(task_name, seed, "not started", note=_carried(resume, scale))


def _carried(resume, scale):
    """Where the repository holds a state of a model this folder has not started."""
    from .training_carry import saved_step, states_dir
    step = saved_step(os.path.join(states_dir(scale), os.path.basename(resume)))
    return "" if step is None else \
        f"the repository holds its state at step {step}: train with --resume-from"


def _resumable(task_name, scale, seed, resume, settings, pid):
    state = torch.load(resume, weights_only=True, mmap=True)
    identity = resume_identity(TrainingPlan(**settings), task_for(task_name, scale))
    if state.get("plan") != json.dumps(identity, sort_keys=True):
        return ModelStatus(task_name, seed, "other recipe",
                           note="a state saved under another plan: restarts from step 0")
    step, budget, elapsed = state["step"], settings["max_steps"], state["elapsed"]
    stages = training_stages(task_name, scale)
    where = ""
    if stages is not None:
        stages.load(json.loads(state["extra"]))
        where = stages.where()
    left = _hours(elapsed / max(step, 1) * (budget - step))
    note = (f"pid {pid}; " if pid else "continues on the next run; ") + \
        f"~{left} to the budget at its pace so far (stops early at {settings['target']:.2f})"
    return ModelStatus(task_name, seed, "training" if pid else "stopped", step, budget,
                       state["held_out"], elapsed, where, note)


def _excluded(info, scale):
    """Which of the model's tasks fall under the 95% rule (all of one, or a shared
    model's listed)."""
    below = [t for t in (SCALES[scale]["tasks"] if SCALES[scale].get("shared") else [info["task"]])
             if task_accuracy(info, t) < MIN_ACCURACY]
    if not below:
        return "passes the 95% rule"
    if not SCALES[scale].get("shared"):
        return "BELOW 95%: excluded"
    return "BELOW 95% (excluded on this scale): " + ", ".join(below)


def _hours(seconds):
    if seconds is None:
        return ""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def status_table(statuses):
    """The statuses as an aligned text table."""
    rows = [["task", "seed", "state", "step", "stage", "held-out", "time", "note"]]
    rows += [s.row() for s in statuses]
    return "\n".join(_aligned(rows))


def _aligned(rows):
    """Text rows of ``rows`` (lists of cells), every column but the last padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def task_accuracy_table(scale, columns):
    """``columns``: [(seed, where, {task: accuracy})] as an aligned text table, each
    task below the 95% rule marked."""
    rows = [["task"] + [f"seed {seed} ({where})" for seed, where, _ in columns]]
    rows += [[t] + [f"{acc[t]:.3f}" + (" <95%" if acc[t] < MIN_ACCURACY else "")
                    for _, _, acc in columns] for t in SCALES[scale]["tasks"]]
    return "\n".join(line.rstrip() for line in _aligned(rows))
