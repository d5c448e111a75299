"""Where a model's training stands in its curriculum (bench/trainer.py).

A curriculum is one or more named tracks; a track is a list of stages, each a
(training task, gate task) pair. Every batch draws its rows from each track's current
stage, and a track moves to its next stage at the evaluation where its gate task's
held-out accuracy reaches STAGE_GATE (a stage without a gate, the last one, stays).

One track is the deep scale's staged hop curriculum (bench.multihop.hop_stages) or a
task's plain training. Many tracks are the multitask scale: every task a track, each
multi-hop task staged on its own gate, so a multi-hop task can train at its short
lengths while the others train at theirs. A batch then holds prompts of several lengths:
it comes as one group of rows per length, each run through the model on its own.
"""
import torch

from .multitask import draw_grouped

STAGE_GATE = 0.9  # a curriculum stage ends when its gate task's held-out accuracy reaches this


def examples(task, n_pairs, gen):
    """``n_pairs`` pairs of ``task`` as training rows: (clean then corrupt prompts, answers)."""
    return rows(task.sample(n_pairs, gen))


def rows(pairs):
    """A set of pairs as model rows: (clean then corrupt prompts, their answers)."""
    return torch.cat([pairs.clean, pairs.corrupt]), torch.cat([pairs.answer, pairs.wrong])


class Curriculum:
    """``tracks``: {name: [(training task, gate task or None)]}. ``weights``: {name: a
    track's share of the rows, relative} (default: equal shares)."""

    def __init__(self, tracks, weights=None):
        if not tracks or any(not stages for stages in tracks.values()):
            raise ValueError("a curriculum needs at least one track, each with a stage")
        self.tracks = {name: list(stages) for name, stages in tracks.items()}
        self.weights = dict(weights) if weights else None
        self.stage = {name: 0 for name in self.tracks}
        self.stage_steps = {name: [0] for name in self.tracks}
        # each staged track's gate accuracy at the last evaluation, while below the gate:
        # whether a long stage is moving at all (shown, saved; it steers nothing)
        self.gate_accuracy = {}

    @classmethod
    def single(cls, task, stages=None):
        """One track: ``stages``, or plain training on ``task``."""
        return cls({task.name: stages or [(task, None)]})

    def current(self, name):
        """The training task track ``name`` draws from now."""
        return self.tracks[name][self.stage[name]][0]

    def batch(self, n_pairs, gen):
        """A training batch of ``n_pairs`` pairs: [(rows, answers)], one group per prompt
        length. One track draws exactly what plain training on its task draws."""
        names = list(self.tracks)
        if len(names) == 1:
            return [examples(self.current(names[0]), n_pairs, gen)]
        weights = [float((self.weights or {}).get(n, 1.0)) for n in names]
        return [rows(p) for p in draw_grouped([self.current(n) for n in names], n_pairs, gen,
                                              weights)]

    def advance(self, step, score):
        """Moves every track whose gate passes to its next stage; ``score(task)`` is the
        model's held-out accuracy on a task."""
        for name, stages in self.tracks.items():
            gate = stages[self.stage[name]][1]
            if gate is None or self.stage[name] + 1 >= len(stages):
                continue
            accuracy = score(gate)
            if accuracy >= STAGE_GATE:
                self.stage[name] += 1
                self.stage_steps[name].append(step)
                self.gate_accuracy.pop(name, None)  # the next stage's gate is not measured yet
            else:
                self.gate_accuracy[name] = round(float(accuracy), 4)

    def last_stage_since(self):
        """The step from which every track has been in its last stage (0 for a
        curriculum of single stages), or None while one is still in an earlier one."""
        if any(self.stage[n] + 1 < len(stages) for n, stages in self.tracks.items()):
            return None
        return max(steps[-1] for steps in self.stage_steps.values())

    def progress(self):
        """The stages, for a progress bar: the stage number of each track that has stages."""
        staged = [name for name, stages in self.tracks.items() if len(stages) > 1]
        if not staged:
            return {}
        shown = {"stage": "/".join(str(self.stage[n]) for n in staged)}
        if self.gate_accuracy:
            shown["gate"] = "/".join(f"{self.gate_accuracy[n]:.2f}" if n in self.gate_accuracy
                                     else "-" for n in staged)
        return shown

    def where(self):
        """Each staged track's stage as text, "stage 3/6 since step 1900" (one track) or
        "var_chain 3/6 since 1900, pointer 2/5 since 300" (many), each with its gate's last
        accuracy when measured ("gate 0.41 of 0.90"); "" when none is staged."""
        staged = [n for n, stages in self.tracks.items() if len(stages) > 1]
        parts = [(n, f"{self.stage[n] + 1}/{len(self.tracks[n])} since "
                     f"{self.stage_steps[n][-1]}" + self._gate_text(n)) for n in staged]
        if len(self.tracks) == 1:
            return "".join(f"stage {text.replace('since', 'since step')}" for _, text in parts)
        return ", ".join(f"{n} {text}" for n, text in parts)

    def _gate_text(self, name):
        if name not in self.gate_accuracy:
            return ""
        return f" (gate {self.gate_accuracy[name]:.2f} of {STAGE_GATE:.2f})"

    def state(self):
        """Where training stands, as saved with a resumable state and recorded with a
        model: one track's stage and the steps its stages began at, and its gate's last
        accuracy while one is measured below the gate; per track for many."""
        if len(self.tracks) == 1:
            (name,) = self.tracks
            state = {"stage": self.stage[name], "stage_steps": list(self.stage_steps[name])}
            gates = self.gate_accuracy.get(name)
        else:
            state = {"stage": dict(self.stage), "stage_steps": {n: list(s) for n, s in
                                                                self.stage_steps.items()}}
            gates = dict(self.gate_accuracy) or None
        return state if gates is None else dict(state, gate_accuracy=gates)

    def load(self, state):
        """Continues from what ``state()`` returned."""
        if len(self.tracks) == 1:
            (name,) = self.tracks
            self.stage[name], self.stage_steps[name] = state["stage"], list(state["stage_steps"])
            gates = {} if state.get("gate_accuracy") is None else {name: state["gate_accuracy"]}
        else:
            self.stage = dict(state["stage"])
            self.stage_steps = {n: list(s) for n, s in state["stage_steps"].items()}
            gates = dict(state.get("gate_accuracy") or {})
        self.gate_accuracy = gates  # states saved before the gate was kept have none
