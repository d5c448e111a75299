"""The 12 synthetic tasks of docs/protocol.md as clean/corrupt pair generators.

One shared vocabulary (128 tokens). Every task has a fixed sequence length;
the answer is the next token after the last position. A pair is a clean and a
corrupt prompt of equal length that differ by a symmetric token replacement;
``answer`` is right for clean, ``wrong`` for corrupt, and ``contrast`` is the
(first) position where they differ.

Binary-variable tasks (greater-than, brackets, pronoun, agreement) give
*oriented* pairs: clean always holds the same value of the variable (yes /
balanced / he / singular) and corrupt the other, so that a contrastive mean
h(clean) - h(corrupt) is a direction for that variable. High-cardinality tasks
cannot be oriented (each pair contrasts different values); that is part of
what the benchmark tests. Training uses clean and corrupt prompts alike, so
the answer classes stay balanced.
"""
from dataclasses import dataclass

import torch

VOCAB = 128
PAD, BOS, EQ, PLUS, GT, OPEN, CLOSE, YES, NO, HE, SHE, VSG, VPL, DEF, DOC, REL, SUCC, COUNT, \
    SORT, TO, VERB, QUERY = range(22)
NUM0, NUM_COUNT = 24, 64    # number tokens: NUM0 + i, i in [0, 64)
SYM0, SYM_COUNT = 88, 40    # symbols / names: SYM0 + j, j in [0, 40)


def num(i):
    return NUM0 + i


def sym(j):
    return SYM0 + j


@dataclass
class Pairs:
    clean: torch.Tensor      # (n, T) int64
    corrupt: torch.Tensor    # (n, T)
    answer: torch.Tensor     # (n,) right answer on clean
    wrong: torch.Tensor      # (n,) right answer on corrupt
    contrast: torch.Tensor   # (n,) position where clean and corrupt differ

    def __len__(self):
        return self.clean.shape[0]

    def select(self, index):
        return Pairs(self.clean[index], self.corrupt[index], self.answer[index],
                     self.wrong[index], self.contrast[index])

    @staticmethod
    def cat(parts):
        """Several tasks' pairs of one length as one set, in order."""
        return Pairs(*(torch.cat([getattr(p, f) for p in parts])
                       for f in ("clean", "corrupt", "answer", "wrong", "contrast")))


def _randint(gen, high, size):
    return torch.randint(0, high, size, generator=gen)


def _distinct(gen, n, k, high):
    """(n, k) rows of k distinct values in [0, high)."""
    return torch.rand(n, high, generator=gen).argsort(1)[:, :k]


class Task:
    name = ""
    seq_len = 0
    binary = False
    description = ""

    def sample(self, n, gen):
        raise NotImplementedError

    def sample_groups(self, n, gen):
        """``n`` pairs as [Pairs], one per prompt length: one here (a mixture of tasks of
        several lengths has more)."""
        return [self.sample(n, gen)]

    def rule(self, prompt):
        """The right answer for one prompt (1-D tensor), from the task's rule."""
        raise NotImplementedError


class Induction(Task):
    name, seq_len = "induction", 10
    description = "copying: [.. a b .. a] -> b"

    def sample(self, n, gen):
        s = _distinct(gen, n, 8, SYM_COUNT) + SYM0
        a, b, b2 = s[:, 0], s[:, 1], s[:, 2]
        clean = torch.stack([torch.full((n,), BOS), s[:, 3], s[:, 4], a, b, s[:, 5], s[:, 6],
                             s[:, 7], s[:, 3], a], 1)
        corrupt = clean.clone()
        corrupt[:, 4] = b2
        return Pairs(clean, corrupt, b, b2, torch.full((n,), 4))

    def rule(self, p):
        return int(p[4])


class IOI(Task):
    name, seq_len = "ioi", 6
    description = "symbolic IOI: [A B gave A to] -> B"

    def sample(self, n, gen):
        s = _distinct(gen, n, 2, SYM_COUNT) + SYM0
        a, b = s[:, 0], s[:, 1]
        clean = torch.stack([torch.full((n,), BOS), a, b, torch.full((n,), VERB), a,
                             torch.full((n,), TO)], 1)
        corrupt = clean.clone()
        corrupt[:, 4] = b
        return Pairs(clean, corrupt, b, a, torch.full((n,), 4))

    def rule(self, p):
        return int(p[2]) if p[4] == p[1] else int(p[1])


class GreaterThan(Task):
    name, seq_len, binary = "greater_than", 5, True
    description = "[x > y ?] -> yes/no"

    def sample(self, n, gen):
        # oriented pairs: clean always has x > y (yes), corrupt moves x below y (no);
        # y in [1, 62] leaves room on both sides
        y = _randint(gen, NUM_COUNT - 2, (n,)) + 1
        u, u2 = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
        x = y + 1 + (u * (NUM_COUNT - 1 - y)).long()
        x2 = (u2 * y).long()
        clean = torch.stack([torch.full((n,), BOS), num(x), torch.full((n,), GT), num(y),
                             torch.full((n,), QUERY)], 1)
        corrupt = clean.clone()
        corrupt[:, 1] = num(x2)
        return Pairs(clean, corrupt, torch.full((n,), YES), torch.full((n,), NO),
                     torch.full((n,), 1))

    def rule(self, p):
        return YES if p[1] > p[3] else NO


class Docstring(Task):
    name, seq_len = "docstring", 8
    description = "argument recall: [def a b c doc a b] -> c"

    def sample(self, n, gen):
        s = _distinct(gen, n, 4, SYM_COUNT) + SYM0
        clean = torch.stack([torch.full((n,), BOS), torch.full((n,), DEF), s[:, 0], s[:, 1],
                             s[:, 2], torch.full((n,), DOC), s[:, 0], s[:, 1]], 1)
        corrupt = clean.clone()
        corrupt[:, 4] = s[:, 3]
        return Pairs(clean, corrupt, s[:, 2], s[:, 3], torch.full((n,), 4))

    def rule(self, p):
        return int(p[4])


_BALANCED = {}


def _balanced(length):
    """All balanced bracket strings of ``length`` (1 = open), as a (count, length) tensor."""
    if length not in _BALANCED:
        rows = []
        for code in range(1 << length):
            seq = [(code >> i) & 1 for i in range(length)]
            depth, ok = 0, True
            for bit in seq:
                depth += 1 if bit else -1
                ok &= depth >= 0
            if ok and depth == 0:
                rows.append(seq)
        _BALANCED[length] = torch.tensor(rows)
    return _BALANCED[length]


class Brackets(Task):
    name, seq_len, binary = "brackets", 10, True
    # 14 balanced strings x 8 flips = 112 distinct pairs: the benchmark shrinks its splits
    # in proportion for this task (length 10 did not train to 95% in 6000 steps)
    body = 8
    description = "balanced brackets: [( ) ( ( ) ) ( ) ?] -> yes/no"

    def sample(self, n, gen):
        bal = _balanced(self.body)
        seqs = bal[_randint(gen, bal.shape[0], (n,))]
        flip = _randint(gen, self.body, (n,))
        flipped = seqs.clone()
        flipped[torch.arange(n), flip] = 1 - flipped[torch.arange(n), flip]
        # oriented pairs: clean balanced (yes), corrupt one bracket flipped (no)
        clean_b, corrupt_b = seqs, flipped

        def encode(bits):
            body = torch.where(bits == 1, OPEN, CLOSE)
            return torch.cat([torch.full((n, 1), BOS), body, torch.full((n, 1), QUERY)], 1)
        return Pairs(encode(clean_b), encode(corrupt_b), torch.full((n,), YES),
                     torch.full((n,), NO), flip + 1)

    def rule(self, p):
        depth = 0
        for t in p[1:1 + self.body].tolist():
            depth += 1 if t == OPEN else -1
            if depth < 0:
                return NO
        return YES if depth == 0 else NO


class ModularAddition(Task):
    name, seq_len = "modular_addition", 5
    modulus = 11
    description = "[a + b =] -> (a + b) mod 11"

    def sample(self, n, gen):
        p = self.modulus
        a, b = _randint(gen, p, (n,)), _randint(gen, p, (n,))
        a2 = (a + 1 + _randint(gen, p - 1, (n,))) % p
        clean = torch.stack([torch.full((n,), BOS), num(a), torch.full((n,), PLUS), num(b),
                             torch.full((n,), EQ)], 1)
        corrupt = clean.clone()
        corrupt[:, 1] = num(a2)
        return Pairs(clean, corrupt, num((a + b) % p), num((a2 + b) % p), torch.full((n,), 1))

    def rule(self, p):
        return num((int(p[1]) - NUM0 + int(p[3]) - NUM0) % self.modulus)


class Sorting(Task):
    name, seq_len = "sorting", 7
    description = "first element of the sorted list: [sort x1 x2 x3 x4 =] -> min"

    def sample(self, n, gen):
        x = _distinct(gen, n, 5, 32)
        vals, spare = x[:, :4], x[:, 4]
        rows = torch.arange(n)
        at = vals.argmin(1)
        lo = vals.min(1).values
        vals2 = vals.clone()
        # the minimum replaced by a value not in the list: the minimum changes either way
        vals2[rows, at] = spare

        def encode(v):
            return torch.cat([torch.full((n, 1), BOS), torch.full((n, 1), SORT), num(v),
                              torch.full((n, 1), EQ)], 1)
        clean, corrupt = encode(vals), encode(vals2)
        return Pairs(clean, corrupt, num(lo), num(vals2.min(1).values), at + 2)

    def rule(self, p):
        return int(p[2:6].min())


class Counting(Task):
    name, seq_len = "counting", 10
    description = "[count X s1..s7] -> number of X among s1..s7"

    def sample(self, n, gen):
        x = sym(_randint(gen, SYM_COUNT, (n,)))
        others = sym((x[:, None] - SYM0 + 1 + _randint(gen, SYM_COUNT - 1, (n, 7))) % SYM_COUNT)
        count = 1 + _randint(gen, 5, (n,))
        order = torch.rand(n, 7, generator=gen).argsort(1)
        is_x = order < count[:, None]
        body = torch.where(is_x, x[:, None], others)
        clean = torch.cat([torch.full((n, 1), BOS), torch.full((n, 1), COUNT), x[:, None], body],
                          1)
        # corrupt: one occurrence of X replaced by another symbol -> count - 1
        first = is_x.float().argmax(1)
        corrupt = clean.clone()
        rows = torch.arange(n)
        corrupt[rows, first + 3] = others[rows, first]
        return Pairs(clean, corrupt, num(count), num(count - 1), first + 3)

    def rule(self, p):
        return num(int((p[3:] == p[2]).sum()))


class Successor(Task):
    name, seq_len = "successor", 3
    description = "[succ n] -> n + 1"

    def sample(self, n, gen):
        a = _randint(gen, NUM_COUNT - 1, (n,))
        a2 = (a + 1 + _randint(gen, NUM_COUNT - 2, (n,))) % (NUM_COUNT - 1)
        clean = torch.stack([torch.full((n,), BOS), torch.full((n,), SUCC), num(a)], 1)
        corrupt = clean.clone()
        corrupt[:, 2] = num(a2)
        return Pairs(clean, corrupt, num(a + 1), num(a2 + 1), torch.full((n,), 2))

    def rule(self, p):
        return int(p[2]) + 1


# fixed "facts": subject j -> attribute number, from a fixed seed
_FACTS = torch.randint(0, 12, (SYM_COUNT,), generator=torch.Generator().manual_seed(7))
# fixed genders / grammatical numbers of names / nouns
_FEMALE = torch.arange(SYM_COUNT) % 2 == 1
_PLURAL = (torch.arange(SYM_COUNT) // 2) % 2 == 1


def _oriented_symbols(gen, cls, n):
    """(clean, corrupt) symbol indices: clean from the class cls == False, corrupt from
    cls == True (oriented pairs of a binary variable)."""
    return (_other_with(gen, cls, torch.zeros(n, dtype=torch.bool), n),
            _other_with(gen, cls, torch.ones(n, dtype=torch.bool), n))


def _other_with(gen, cls, want, n):
    """For each row, a random symbol j with cls[j] == want[row]."""
    pick = torch.empty(n, dtype=torch.long)
    pools = {v: torch.nonzero(cls == v).flatten() for v in (False, True)}
    for v, pool in pools.items():
        rows = torch.nonzero(want == v).flatten()
        pick[rows] = pool[_randint(gen, pool.numel(), (rows.numel(),))]
    return pick


class FactualRecall(Task):
    name, seq_len = "factual_recall", 6
    description = "[f1 f2 subject rel ?] -> attribute(subject) (a fixed random map)"

    def sample(self, n, gen):
        s = _randint(gen, SYM_COUNT, (n,))
        s2 = (s + 1 + _randint(gen, SYM_COUNT - 1, (n,))) % SYM_COUNT
        same = _FACTS[s2] == _FACTS[s]
        while same.any():  # the corrupt subject must have another attribute
            s2[same] = (s2[same] + 1) % SYM_COUNT
            s2[same & (s2 == s)] = (s2[same & (s2 == s)] + 1) % SYM_COUNT
            same = _FACTS[s2] == _FACTS[s]
        f = num(_randint(gen, NUM_COUNT, (n, 2)))
        clean = torch.cat([torch.full((n, 1), BOS), f, sym(s)[:, None], torch.full((n, 1), REL),
                           torch.full((n, 1), QUERY)], 1)
        corrupt = clean.clone()
        corrupt[:, 3] = sym(s2)
        return Pairs(clean, corrupt, num(_FACTS[s]), num(_FACTS[s2]), torch.full((n,), 3))

    def rule(self, p):
        return num(int(_FACTS[int(p[3]) - SYM0]))


class Pronoun(Task):
    name, seq_len, binary = "pronoun", 6, True
    description = "[name verb f1 f2 ?] -> he/she by the name's gender"

    def sample(self, n, gen):
        s, s2 = _oriented_symbols(gen, _FEMALE, n)  # clean: he, corrupt: she
        f = num(_randint(gen, NUM_COUNT, (n, 2)))
        clean = torch.cat([torch.full((n, 1), BOS), sym(s)[:, None], torch.full((n, 1), VERB), f,
                           torch.full((n, 1), QUERY)], 1)
        corrupt = clean.clone()
        corrupt[:, 1] = sym(s2)
        return Pairs(clean, corrupt, torch.where(_FEMALE[s], SHE, HE),
                     torch.where(_FEMALE[s2], SHE, HE), torch.full((n,), 1))

    def rule(self, p):
        return SHE if _FEMALE[int(p[1]) - SYM0] else HE


class Agreement(Task):
    name, seq_len, binary = "agreement", 6, True
    description = "[noun a1 a2 a3 ?] -> verb form by the noun's number (attractors a_i)"

    def sample(self, n, gen):
        s, s2 = _oriented_symbols(gen, _PLURAL, n)  # clean: singular, corrupt: plural
        attractors = sym(_randint(gen, SYM_COUNT, (n, 3)))
        clean = torch.cat([torch.full((n, 1), BOS), sym(s)[:, None], attractors,
                           torch.full((n, 1), QUERY)], 1)
        corrupt = clean.clone()
        corrupt[:, 1] = sym(s2)
        return Pairs(clean, corrupt, torch.where(_PLURAL[s], VPL, VSG),
                     torch.where(_PLURAL[s2], VPL, VSG), torch.full((n,), 1))

    def rule(self, p):
        return VPL if _PLURAL[int(p[1]) - SYM0] else VSG


TASKS = {t.name: t for t in (Induction(), IOI(), GreaterThan(), Docstring(), Brackets(),
                             ModularAddition(), Sorting(), Counting(), Successor(),
                             FactualRecall(), Pronoun(), Agreement())}

# The two families of docs/protocol.md: one binary variable (oriented pairs, a consistent
# contrast direction) vs pairs that each contrast different tokens.
FAMILIES = {"consistent": tuple(n for n, t in TASKS.items() if t.binary),
            "symmetric": tuple(n for n, t in TASKS.items() if not t.binary),
            # protocol v4's multi-hop tasks (bench/multihop.py; the deep scale)
            "multihop": ("var_chain", "pointer", "increment_chain")}
