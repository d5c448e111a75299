"""The `standard` scale's layout (docs/protocol.md v3): a task's tokens spread over a
longer sequence, random filler between its units, at least MIN_AFTER_CONTRAST positions
between the contrast position p* and the answer position.
"""
import torch

from .tasks import EQ, QUERY, TASKS, VOCAB, Pairs, Task

# `standard` scale (docs/protocol.md v3): the task's tokens spread over a longer sequence,
# random filler tokens (32 of their own) placed *between* the task's units, so that at least
# MIN_AFTER_CONTRAST positions lie between p* and the answer position.
FILLER0, FILLER_COUNT = VOCAB, 32
VOCAB_STANDARD = VOCAB + FILLER_COUNT
MIN_AFTER_CONTRAST = 8

# Gaps (before compact token k) where filler never goes: units the task reads as one.
# induction copies the bigram (a b); docstring recalls the argument after (a b) in the
# definition, so the argument list and the query stay contiguous.
JOINED = {"induction": (4,), "docstring": (3, 4, 7)}
# A trailing query token for tasks whose p* can be the compact prompt's last token (the
# answer is read at the last position, so nothing could lie between them).
SUFFIX = {"successor": (EQ,), "counting": (QUERY,)}


class Spread(Task):
    """``task`` at length ``seq_len``, filler spread between its units (v3 layout).

    Per pair: the filler after p* is at least what puts MIN_AFTER_CONTRAST positions
    between p* and the answer position; the rest goes to gaps drawn uniformly. Clean and
    corrupt share the layout and the filler tokens; the layout varies across pairs."""

    def __init__(self, task, seq_len):
        self.task, self.seq_len = task, seq_len
        self.name, self.binary, self.description = task.name, task.binary, task.description
        self.suffix = SUFFIX.get(task.name, ())
        compact = task.seq_len + len(self.suffix)
        joined = set(JOINED.get(task.name, ()))
        self.gaps = [k for k in range(1, compact) if k not in joined]
        self.compact = compact
        # worst case: p* on the compact prompt's second-last token
        if seq_len - compact < MIN_AFTER_CONTRAST:
            raise ValueError(f"seq_len={seq_len} leaves {seq_len - compact} filler positions "
                             f"for task {task.name!r} ({compact} tokens); the v3 layout needs "
                             f"{MIN_AFTER_CONTRAST}")

    def layout(self, contrast, gen):
        """(n, compact) positions of the compact tokens for compact contrast positions."""
        n, gaps = contrast.shape[0], torch.tensor(self.gaps)
        counts = torch.zeros(n, self.compact, dtype=torch.long)  # filler before token k
        after = self.compact - 1 - contrast          # task tokens after p*
        need = (MIN_AFTER_CONTRAST + 1 - after).clamp_min(0)
        free = self.seq_len - self.compact
        rows = torch.arange(n)
        eligible = gaps[None, :] > contrast[:, None]  # gaps after p*
        for j in range(free):
            forced = j < need
            weights = torch.where(forced[:, None], eligible.float(), torch.ones(n, len(gaps)))
            pick = gaps[torch.multinomial(weights, 1, generator=gen).squeeze(1)]
            counts[rows, pick] += 1
        return torch.arange(self.compact)[None, :] + counts.cumsum(1)

    def sample(self, n, gen):
        p = self.task.sample(n, gen)
        suffix = torch.tensor(self.suffix, dtype=torch.long).expand(n, -1)
        clean, corrupt = (torch.cat([x, suffix], 1) for x in (p.clean, p.corrupt))
        where = self.layout(p.contrast, gen)
        filler = torch.randint(0, FILLER_COUNT, (n, self.seq_len), generator=gen) + FILLER0
        out_clean = filler.clone().scatter_(1, where, clean)
        out_corrupt = filler.scatter_(1, where, corrupt)
        contrast = where[torch.arange(n), p.contrast]
        return Pairs(out_clean, out_corrupt, p.answer, p.wrong, contrast)

    def rule(self, p):
        compact = p[p < FILLER0]
        return self.task.rule(compact[:self.task.seq_len])


def task_at(name, seq_len=None):
    """Task ``name`` at its own length (``None``: the toy scale) or padded to ``seq_len``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    task = TASKS[name]
    return task if seq_len is None else Spread(task, seq_len)
