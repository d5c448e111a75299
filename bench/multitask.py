"""Protocol v4's `multitask` scale (docs/protocol.md): one model per training seed trained
on every task at once, each prompt led by its task's token, so that every task shares
one residual stream and a steering vector has to find its task's direction among the
others. The tasks keep their own lengths (bench/scales.py lays them out).

``TaskToken(task, token)`` is ``task`` behind its task token (one position longer);
``Mixture(tasks)`` draws each row's task uniformly (the shared model's held-out set, one
group of pairs per length; a multi-hop task's depths mixed, bench.multihop.hop_mixture).
The shared model trains through a curriculum of one track per task (bench/curriculum.py).
"""
import torch

from .tasks import Pairs, Task


class TaskToken(Task):
    """``task`` behind its task token: every position (and p*) one to the right."""

    def __init__(self, task, token):
        self.task, self.token = task, token
        self.name, self.binary, self.description = task.name, task.binary, task.description
        self.family = getattr(task, "family", None)
        self.seq_len = task.seq_len + 1

    def sample(self, n, gen):
        p = self.task.sample(n, gen)
        head = torch.full((n, 1), self.token, dtype=torch.long)
        return Pairs(torch.cat([head, p.clean], 1), torch.cat([head, p.corrupt], 1), p.answer,
                     p.wrong, p.contrast + 1)

    def rule(self, prompt):
        return self.task.rule(prompt[1:])


class Mixture(Task):
    """Every task at once: each row's task drawn uniformly. Tasks of several lengths
    come as one group of pairs per length (``sample_groups``)."""
    name, binary, description = "multitask", False, "every task, a task token first"

    def __init__(self, tasks):
        self.tasks = list(tasks)
        self.seq_len = max(t.seq_len for t in self.tasks)
        self.one_length = all(t.seq_len == self.seq_len for t in self.tasks)

    def sample(self, n, gen):
        if not self.one_length:
            raise ValueError("the tasks of this mixture have several lengths: use "
                             "sample_groups, one set of pairs per length")
        # its own draw, not draw_grouped's: the deep models' hop mixtures sample through
        # here, and another draw would change their batches
        which = torch.randint(0, len(self.tasks), (n,), generator=gen)
        parts = [self.tasks[k].sample(int((which == k).sum()), gen)
                 for k in range(len(self.tasks))]
        order = torch.cat([torch.nonzero(which == k).flatten() for k in range(len(self.tasks))])
        out = [torch.empty_like(torch.cat([getattr(p, f) for p in parts]))
               for f in ("clean", "corrupt", "answer", "wrong", "contrast")]
        for x, f in zip(out, ("clean", "corrupt", "answer", "wrong", "contrast")):
            x[order] = torch.cat([getattr(p, f) for p in parts])
        return Pairs(*out)

    def sample_groups(self, n, gen):
        if self.one_length:
            return [self.sample(n, gen)]
        return draw_grouped(self.tasks, n, gen)

    def rule(self, prompt):
        token = int(prompt[0])
        return next(t for t in self.tasks if t.token == token).rule(prompt)


def draw_grouped(tasks, n, gen, weights=None):
    """``n`` pairs, each row's task drawn by ``weights`` (relative; default equal):
    [Pairs], one per prompt length, each task's rows in task order."""
    share = torch.tensor(weights or [1.0] * len(tasks), dtype=torch.float64)
    which = torch.multinomial(share, n, replacement=True, generator=gen)
    groups = {}
    for k, task in enumerate(tasks):
        count = int((which == k).sum())
        if count:
            groups.setdefault(task.seq_len, []).append(task.sample(count, gen))
    return [Pairs.cat(parts) for parts in groups.values()]
