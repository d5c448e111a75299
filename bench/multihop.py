"""Protocol v4's multi-hop tasks (docs/protocol.md, "Models and tasks"): the answer
cannot be computed at the answer position within the model's depth, so a model that
solves them must carry intermediate results at intermediate positions.

- ``var_chain``: assignments ``let x0 v  let x1 x0 ... let xh x(h-1)`` with a distractor chain
  of h - 1 hops interleaved and filler between statements, then ``? xh``: the answer is
  the root value v. Every chain's root statement comes first, in random order, so the
  target's root is neither the first number nor told apart by where it stands, and the
  distractor is one hop shorter, so telling the chains apart by length takes as many hops
  as following the chain. Corrupt: another root value (p* = v's position, early).
- ``pointer``: links ``a > b`` of two chains written in an order unrelated to either
  chain, the start node given early (``START s``, p* = s), and the query ``? h`` at the
  end: the node h steps from the start. Corrupt: the other chain's first node.
- ``increment_chain`` (our design): ``let x0 v  let x1 x0 + ... let xh x(h-1) +`` (``+``: plus
  one), laid out as var_chain, then ``? xh``: the answer is v + h (mod the 64 numbers).
  Each hop changes the carried value, so no position before the query holds the answer.

Every pair: clean and corrupt of equal length differing at one position p*, answers y /
y'. Tokens: the standard vocabulary (bench.spread): numbers, symbols as variables and
nodes, filler tokens between statements (they also separate the statements).
"""
import torch

from .spread import FILLER0, FILLER_COUNT
from .tasks import BOS, GT, NUM_COUNT, PLUS, QUERY, SYM0, SYM_COUNT, Pairs, Task, num

START = 23  # free ids below the numbers (NUM0 = 24)
# A var task's statement is ``let name source``: the source right after its name. With
# ``name = source`` (the source two tokens on), two-pair key-value recall at 12 tokens sat
# at chance for 1600 steps where the adjacent layout at 10 tokens learned it by step 500,
# and 0-hop var_chain at 16 tokens stayed at chance for 1400 (standard/deep models, lr 1e-3,
# 64 pairs, measured 2026-12-03). The lookup is induction-like; with the source adjacent,
# its first half can be a previous-token head.
LET = 22


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

    def _layout(self, statements, order, query, gen, contrast_in):
        """Assembles (n, T) prompts: BOS, the statements (a list of (n, k) tensors) in each
        row's own ``order`` ((n, S): the statement at each slot), filler spread between
        them, then the query. ``contrast_in``: (statement index, offset) of p*. Returns
        (prompts, p* positions). Every row has its own order: a batch sharing one layout
        gives a positional guess the same answer on every row, so a training step pushes
        the whole batch toward one position and evaluation measures one layout."""
        n, T = query.shape[0], self.seq_len
        lengths = torch.tensor([s.shape[1] for s in statements])
        tokens = torch.zeros(n, len(statements), int(lengths.max()), dtype=torch.long)
        for k, s in enumerate(statements):
            tokens[:, k, :s.shape[1]] = s
        free = T - int(lengths.sum()) - 1 - query.shape[1]
        gaps = torch.zeros(n, len(statements) + 1, dtype=torch.long)  # filler after slot k-1
        rows = torch.arange(n)
        for _ in range(free):
            gaps[rows, torch.randint(0, len(statements) + 1, (n,), generator=gen)] += 1
        out = torch.randint(0, FILLER_COUNT, (n, T), generator=gen) + FILLER0
        out[:, 0] = BOS
        pos = torch.ones(n, dtype=torch.long)
        contrast = torch.zeros(n, dtype=torch.long)
        for slot in range(len(statements)):
            pos = pos + gaps[:, slot]
            k = order[:, slot]
            for j in range(tokens.shape[2]):
                m = j < lengths[k]
                out[rows[m], pos[m] + j] = tokens[rows[m], k[m], j]
            contrast = torch.where(k == contrast_in[0], pos + contrast_in[1], contrast)
            pos = pos + lengths[k]
        pos = pos + gaps[:, -1]
        for j in range(query.shape[1]):
            out[rows, pos + j] = query[:, j]
        return out, contrast


def _interleave(gen, sizes, n):
    """Each row's statement order, (n, S), over chains of ``sizes`` statements numbered
    chain by chain (chain c's statement i is sum(sizes[:c]) + i): every chain's root
    statement first, in random order (the target chain, chain 0, is not told apart by
    where its root stands), then the other statements, each chain's in its own order,
    the chains interleaved at random (uniformly over interleavings)."""
    sizes = torch.tensor(sizes)
    base = torch.cumsum(sizes, 0) - sizes  # each chain's root statement
    roots = base[_perm(gen, n, len(sizes), len(sizes))]
    label = torch.repeat_interleave(torch.arange(len(sizes)), sizes - 1)  # one per hop
    label = label[_perm(gen, n, len(label), len(label))]  # which chain's next hop
    seen = torch.cumsum(label[:, :, None] == torch.arange(len(sizes)), 1)
    nth = seen.gather(2, label[:, :, None])[:, :, 0]  # 1 for a chain's first hop, ...
    return torch.cat([roots, base[label] + nth], 1)


class VarChain(_Statements):
    name = "var_chain"
    description = "let x0 v  let x1 x0 ... ? xh -> v (h hops, a distractor chain of h - 1)"
    hop_len = 3  # let name source

    def lengths(self):
        """Hops of the target chain, then of each distractor chain (one fewer)."""
        return [self.hops] + [max(1, self.hops - 1)] * self.distractors

    def compact_len(self):
        return 1 + sum(3 + self.hop_len * h for h in self.lengths()) + 2

    def _chains(self, n, gen):
        lengths = self.lengths()
        var = _perm(gen, n, sum(h + 1 for h in lengths), SYM_COUNT) + SYM0
        value = _perm(gen, n, len(lengths) + 1, NUM_COUNT)  # the last column: corrupt root
        chains, at = [], 0
        for k, h in enumerate(lengths):
            names = var[:, at:at + h + 1]
            at += h + 1
            stmts = [torch.stack([torch.full((n,), LET), names[:, 0], num(value[:, k])], 1)]
            for i in range(1, h + 1):
                stmts.append(self._hop(names[:, i], names[:, i - 1], n))
            chains.append(stmts)
        return chains, var[:, self.hops], value

    def _hop(self, name, source, n):
        return torch.stack([torch.full((n,), LET), name, source], 1)

    def _answer(self, root):
        return num(root)

    def sample(self, n, gen):
        chains, query_var, value = self._chains(n, gen)
        order = _interleave(gen, [len(c) for c in chains], n)
        statements = [s for chain in chains for s in chain]
        query = torch.stack([torch.full((n,), QUERY), query_var], 1)
        clean, contrast = self._layout(statements, order, query, gen, (0, 2))
        corrupt = clean.clone()
        rows = torch.arange(n)
        corrupt[rows, contrast] = num(value[:, -1])
        return Pairs(clean, corrupt, self._answer(value[:, 0]), self._answer(value[:, -1]),
                     contrast)

    def rule(self, p):
        """The answer read off a prompt: every ``let name source [+]`` statement in order
        (filler and the query dropped), then the queried variable's value."""
        p = [int(x) for x in p if int(x) < FILLER0]
        q = p.index(QUERY)
        env = {}
        for j in (j for j in range(q) if p[j] == LET):
            name, src = p[j + 1], p[j + 2]
            plus = j + 3 < q and p[j + 3] == PLUS
            base = env[src] if src in env else src - num(0)
            env[name] = (base + (1 if plus else 0)) % NUM_COUNT
        return num(env[p[q + 1]])


class IncrementChain(VarChain):
    name = "increment_chain"
    description = "let x0 v  let x1 x0 + ... ? xh -> v + h (mod 64)"
    hop_len = 4  # let name source +

    def _hop(self, name, source, n):
        return torch.stack([torch.full((n,), LET), name, source, torch.full((n,), PLUS)], 1)

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
        statements = [torch.stack([torch.full((n,), START), first[:, 0]], 1)] + links
        # START first, the links in an order unrelated to either chain (each row its own)
        order = torch.cat([torch.zeros(n, 1, dtype=torch.long),
                           1 + _perm(gen, n, len(links), len(links))], 1)
        query = torch.stack([torch.full((n,), QUERY), torch.full((n,), num(h))], 1)
        clean, contrast = self._layout(statements, order, query, gen, (0, 1))
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


def hop_mixture(name, low, high, seq_len):
    """Training rows of task ``name`` whose hop count is drawn uniformly from low..high, at
    the same length (more filler on shorter chains)."""
    from .multitask import Mixture
    mixture = Mixture([multihop_task(name, k, seq_len) for k in range(low, high + 1)])
    mixture.name, mixture.description = name, f"{name}, {low}-{high} hops mixed (training)"
    mixture.rule = mixture.tasks[-1].rule  # the rule reads the chain off any depth's prompt
    return mixture


# Filler tokens a short stage's prompts carry beyond the statements (see hop_stages): none.
# 0-hop var_chain on the deep model (lr 1e-3, 64 pairs, seed 0) sat at chance for 2000 steps
# at 16 tokens (4 filler) and left it at 12 (none) by step 1000 (0.83 at step 1100); pointer's
# 2-hop stage from one start learned as fast with 0 as with 4 (docs/protocol.md).
STAGE_SLACK = 0


def hop_stages(name, hops, seq_len):
    """The staged hop curriculum of the ``hops``-hop task ``name``: [(training task, gate
    task)], one stage per lookup depth, then the full length. Stage k trains on every depth
    up to k, mixed, at the shortest length that holds depth k (plus STAGE_SLACK filler tokens),
    and ends when the model follows k there (its gate); the last stage mixes every depth at
    ``seq_len`` and runs to the target. Depths count lookups: pointer's k hops are k of
    them, a var task's k hops k + 1 (the root's value is one more), so the var tasks start
    at 0 hops (``? x0``: recall the root).

    Why stages: only the whole chain decides the answer, so a model that cannot yet do one
    lookup gets no gradient toward five. Why short: the plateau before a lookup (an
    induction-like head) forms grows with the context length. Measured (standard size,
    two-pair key-value recall, lr 1e-3, 64 pairs): at 10 tokens it left chance at step 500
    and reached 0.93 by 800; at 24 tokens it sat at chance for 1300 steps, and 0-hop
    var_chain (lr 3e-3) at 24 tokens for 1500. A lookup learned short does not simply carry
    over (var_chain seed 0 in stage 3 had fallen back to chance on the earlier stages'
    lengths): each stage relearns it at its length from what the earlier ones built, and
    only the last stage's length counts (the target and the 95% rule are read there)."""
    first = first_depth(name)
    stages = []
    for k in range(first, hops + 1):
        length = min(seq_len, multihop_task(name, k, seq_len).compact_len() + STAGE_SLACK)
        stages.append((hop_mixture(name, first, k, length), multihop_task(name, k, length)))
    return stages + [(hop_mixture(name, first, hops, seq_len), None)]


def first_depth(name):
    """The fewest hops of task ``name`` that still ask for a lookup (see hop_stages)."""
    return 1 if name == "pointer" else 0
