"""Protocol v4's multi-hop tasks (docs/protocol.md, "Models and tasks"): the answer
cannot be computed at the answer position within the model's depth, so a model that
solves them must carry intermediate results at intermediate positions.

- ``var_chain``: assignments ``x0 = v ; x1 = x0 ; ... ; xh = x(h-1) ;`` with distractor
  chains (a third as long) interleaved and filler between statements, then ``? xh``: the answer is the
  root value v. Corrupt: another root value (p* = v's position, early).
- ``pointer``: links ``a > b`` of two chains written in an order unrelated to either
  chain, the start node given early (``START s``, p* = s), and the query ``? h`` at the
  end: the node h steps from the start. Corrupt: the other chain's first node.
- ``increment_chain`` (our design): ``x0 = v ; x1 = x0 + 1 ; ... ; xh = x(h-1) + 1 ;``
  with distractors, then ``? xh``: the answer is v + h (mod the 64 numbers). Each hop
  changes the carried value, so no position before the query holds the answer.

Every pair: clean and corrupt of equal length differing at one position p*, answers y /
y'. Tokens: the standard vocabulary (bench.spread): numbers, symbols as variables and
nodes, filler tokens between statements.
"""
import torch

from .spread import FILLER0, FILLER_COUNT
from .tasks import BOS, EQ, GT, NUM_COUNT, PLUS, QUERY, SYM0, SYM_COUNT, Pairs, Task, num

SEP, START = 22, 23  # the two free ids below the numbers (NUM0 = 24): ";" and "START"
ONE = num(1)


def _perm(gen, n, k, high):
    return torch.rand(n, high, generator=gen).argsort(1)[:, :k]


class _Statements(Task):
    """A prompt made of statements (token lists) in a given order, filler between them
    up to ``seq_len``, a final query; subclasses say which statements and answer."""
    binary = False
    family = "multihop"

    def __init__(self, hops, seq_len, distractors=1):
        self.hops, self.seq_len, self.distractors = hops, seq_len, distractors
        if self.compact_len() > seq_len:
            raise ValueError(f"{self.name}: {hops} hops and {distractors} distractor chain(s) "
                             f"need {self.compact_len()} tokens, more than seq_len={seq_len}")

    def compact_len(self):
        raise NotImplementedError

    def _layout(self, statements, query, gen, contrast_in, n):
        """Assembles (n, T) prompts: BOS, statements (lists of (n, k) tensors) with filler
        spread between them, then the query. ``contrast_in``: (statement index, offset) of
        p*. Returns (prompts, p* positions)."""
        T = self.seq_len
        body = sum(s.shape[1] for s in statements) + 1 + query.shape[1]
        free = T - body
        gaps = torch.zeros(n, len(statements) + 1, dtype=torch.long)  # filler after stmt k-1
        for _ in range(free):
            pick = torch.randint(0, len(statements) + 1, (n,), generator=gen)
            gaps[torch.arange(n), pick] += 1
        out = torch.randint(0, FILLER_COUNT, (n, T), generator=gen) + FILLER0
        out[:, 0] = BOS
        pos = torch.ones(n, dtype=torch.long)
        contrast = torch.zeros(n, dtype=torch.long)
        rows = torch.arange(n)
        for k, s in enumerate(statements):
            pos = pos + gaps[:, k]
            for j in range(s.shape[1]):
                out[rows, pos + j] = s[:, j]
            if k == contrast_in[0]:
                contrast = pos + contrast_in[1]
            pos = pos + s.shape[1]
        pos = pos + gaps[:, -1]
        for j in range(query.shape[1]):
            out[rows, pos + j] = query[:, j]
        return out, contrast


def _interleave(gen, n, chains):
    """Statement order: every chain's statements in their own order, chains interleaved
    at random; the target chain (chains[0]) starts first (its root is early). Returns a
    list of (chain, index) in prompt order (the same for all n rows)."""
    order = [(0, 0)]
    left = [list(range(1 if c == 0 else 0, len(chains[c]))) for c in range(len(chains))]
    while any(left):
        live = [c for c in range(len(chains)) if left[c]]
        c = live[int(torch.randint(0, len(live), (1,), generator=gen))]
        order.append((c, left[c].pop(0)))
    return order


class VarChain(_Statements):
    name = "var_chain"
    description = "x0 = v ; x1 = x0 ; ... ; ? xh -> v (h hops, distractor chains)"

    def lengths(self):
        """Hops of the target chain, then of each distractor chain (shorter: a third)."""
        return [self.hops] + [max(1, self.hops // 3)] * self.distractors

    def compact_len(self):
        return 1 + sum(4 + 4 * h for h in self.lengths()) + 2

    def _chains(self, n, gen):
        lengths = self.lengths()
        var = _perm(gen, n, sum(h + 1 for h in lengths), SYM_COUNT) + SYM0
        value = _perm(gen, n, len(lengths) + 1, NUM_COUNT)  # the last column: corrupt root
        chains, at = [], 0
        for k, h in enumerate(lengths):
            names = var[:, at:at + h + 1]
            at += h + 1
            stmts = [torch.stack([names[:, 0], torch.full((n,), EQ), num(value[:, k]),
                                  torch.full((n,), SEP)], 1)]
            for i in range(1, h + 1):
                stmts.append(self._hop(names[:, i], names[:, i - 1], n))
            chains.append(stmts)
        return chains, var[:, self.hops], value

    def _hop(self, name, source, n):
        return torch.stack([name, torch.full((n,), EQ), source, torch.full((n,), SEP)], 1)

    def _answer(self, root):
        return num(root)

    def sample(self, n, gen):
        chains, query_var, value = self._chains(n, gen)
        order = _interleave(gen, n, chains)
        statements = [chains[c][i] for c, i in order]
        query = torch.stack([torch.full((n,), QUERY), query_var], 1)
        clean, contrast = self._layout(statements, query, gen, (0, 2), n)
        corrupt = clean.clone()
        rows = torch.arange(n)
        corrupt[rows, contrast] = num(value[:, -1])
        return Pairs(clean, corrupt, self._answer(value[:, 0]), self._answer(value[:, -1]),
                     contrast)

    def rule(self, p):
        p = [int(x) for x in p if int(x) < FILLER0]
        env, i = {}, 1
        while i < len(p) and p[i] != QUERY:
            name, src = p[i], p[i + 2]
            plus = p[i + 3] == PLUS
            base = env[src] if src in env else src - num(0)
            env[name] = (base + (1 if plus else 0)) % NUM_COUNT
            i += 6 if plus else 4
        return num(env[p[i + 1]])


class IncrementChain(VarChain):
    name = "increment_chain"
    description = "x0 = v ; x1 = x0 + 1 ; ... ; ? xh -> v + h (mod 64)"

    def compact_len(self):
        return 1 + sum(4 + 6 * h for h in self.lengths()) + 2

    def _hop(self, name, source, n):
        return torch.stack([name, torch.full((n,), EQ), source, torch.full((n,), PLUS),
                            torch.full((n,), ONE), torch.full((n,), SEP)], 1)

    def _answer(self, root):
        return num((root + self.hops) % NUM_COUNT)


class Pointer(_Statements):
    name = "pointer"
    description = "links a > b ; shuffled, START s early, ? h at the end -> the node h steps on"

    def compact_len(self):
        return 1 + 2 + 3 * self.hops * 2 + 2

    def sample(self, n, gen):
        h = self.hops
        nodes = _perm(gen, n, 2 * (h + 1), SYM_COUNT) + SYM0
        first, second = nodes[:, :h + 1], nodes[:, h + 1:]
        links = [torch.stack([ch[:, i], torch.full((n,), GT), ch[:, i + 1]], 1)
                 for ch in (first, second) for i in range(h)]
        order = torch.randperm(len(links), generator=gen).tolist()  # unrelated to the chains
        statements = [torch.stack([torch.full((n,), START), first[:, 0]], 1)] + \
            [links[k] for k in order]
        query = torch.stack([torch.full((n,), QUERY), torch.full((n,), num(h))], 1)
        clean, contrast = self._layout(statements, query, gen, (0, 1), n)
        corrupt = clean.clone()
        corrupt[torch.arange(n), contrast] = second[:, 0]
        return Pairs(clean, corrupt, first[:, h], second[:, h], contrast)

    def rule(self, p):
        p = [int(x) for x in p if int(x) < FILLER0]
        start = p[p.index(START) + 1]
        nxt = {p[i]: p[i + 2] for i in range(len(p) - 2) if p[i + 1] == GT}
        steps = p[p.index(QUERY) + 1] - num(0)
        node = start
        for _ in range(steps):
            node = nxt[node]
        return node


MULTIHOP = {"var_chain": VarChain, "pointer": Pointer, "increment_chain": IncrementChain}


def multihop_task(name, hops, seq_len, distractors=1):
    """A multi-hop task with ``hops`` hops at length ``seq_len``."""
    if name not in MULTIHOP:
        raise ValueError(f"unknown multi-hop task {name!r}; choose from {', '.join(MULTIHOP)}")
    if name == "pointer":
        return Pointer(hops, seq_len)
    return MULTIHOP[name](hops, seq_len, distractors)
