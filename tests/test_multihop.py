"""Protocol v4's multi-hop task generators (bench/multihop.py): the rule gives the
answer, pairs differ at one early position, the hop counts are as stated, answers are
balanced, and no token collides with the shared vocabulary's other roles."""
import collections

import pytest
import torch

from steerops.bench import multihop as MH
from steerops.bench.spread import FILLER0, VOCAB_STANDARD
from steerops.bench.tasks import NUM0, NUM_COUNT, QUERY


CASES = [("var_chain", 5, 40), ("var_chain", 7, 48), ("pointer", 5, 48), ("pointer", 7, 48),
         ("increment_chain", 5, 48)]


def _sources(prompt):
    """{variable: its source} of a var-task prompt (statements ``let name source [+]``), and
    the queried variable."""
    p = [int(x) for x in prompt if int(x) < FILLER0]
    q = p.index(QUERY)
    return {p[j + 1]: p[j + 2] for j in range(q) if p[j] == MH.LET}, p[q + 1]


def _depth(prompt, name=None):
    """The number of hops from the queried variable back to a literal (var tasks), read
    off the prompt alone."""
    src, var = _sources(prompt)
    hops = 0
    while var in src:
        var, hops = src[var], hops + 1
    return hops - 1  # the root statement assigns a literal


@pytest.mark.parametrize("name, hops, T", CASES)
def test_multihop_pairs_follow_the_rule_and_differ_at_one_early_position(name, hops, T):
    task = MH.multihop_task(name, hops, T)
    n = 200
    p = task.sample(n, torch.Generator().manual_seed(1))
    assert p.clean.shape == p.corrupt.shape == (n, T)
    assert int(p.clean.max()) < VOCAB_STANDARD and int(p.clean.min()) >= 0
    rows = torch.arange(n)
    assert ((p.clean != p.corrupt).sum(1) == 1).all()
    assert (p.clean[rows, p.contrast] != p.corrupt[rows, p.contrast]).all()
    assert (p.answer != p.wrong).all()
    # p* early: in the first third of the prompt, the query at the end
    assert int(p.contrast.max()) < T // 3 + 4 and (p.clean[:, -2] == QUERY).all()
    for i in range(0, n, 5):
        assert task.rule(p.clean[i]) == int(p.answer[i])
        assert task.rule(p.corrupt[i]) == int(p.wrong[i])
        if name != "pointer":
            assert _depth(p.clean[i], name) == hops
    if name == "pointer":  # the query asks for `hops` steps
        assert (p.clean[:, -1] == NUM0 + hops).all()


@pytest.mark.parametrize("name", list(MH.MULTIHOP))
def test_multihop_answers_are_balanced(name):
    task = MH.multihop_task(name, 5, 48)
    p = task.sample(4000, torch.Generator().manual_seed(2))
    counts = collections.Counter(p.answer.tolist())
    # uniform over the answer set: no answer more than twice its fair share
    assert len(counts) >= 30 and max(counts.values()) < 2 * 4000 / len(counts)


@pytest.mark.parametrize("name", ["var_chain", "increment_chain"])
def test_no_position_or_length_tells_the_target_chain(name):
    """The shortcut the first layout allowed (a model at 100% after 100 steps): the
    target's root was always the prompt's first number. Every chain's root now comes
    first in random order, and the distractor is one hop shorter than the target. Each
    row has its own order: within one call (one training batch), the target's root is
    first in about half the rows."""
    task = MH.multihop_task(name, 5, 48)
    p = task.sample(200, torch.Generator().manual_seed(0))
    first_is_target = []
    for row, contrast in zip(p.clean, p.contrast.tolist()):
        numbers = [i for i, t in enumerate(row.tolist()) if NUM0 <= t < NUM0 + NUM_COUNT
                   and row[i - 2] == MH.LET]
        assert len(numbers) == 2  # two roots, both before any hop statement
        first_is_target.append(numbers[0] == contrast)
        hops = sorted(_depth_from(row, v) for v in (row[numbers[0] - 1], row[numbers[1] - 1]))
        assert hops == [4, 5]
    assert 70 < sum(first_is_target) < 130


@pytest.mark.parametrize("name", list(MH.MULTIHOP))
def test_every_row_has_its_own_statement_order(name):
    """A batch laid out alike would let a positional guess be right or wrong on every
    row at once; the rows of one call have different statement orders."""
    p = MH.multihop_task(name, 5, 48).sample(50, torch.Generator().manual_seed(4))
    orders = {_statement_order(row, name) for row in p.clean}
    assert len(orders) > 40


def _statement_order(prompt, name):
    """Each statement in prompt order as (on the target chain?, its depth on its chain):
    the layout, whatever the symbols drawn."""
    p = [int(x) for x in prompt if int(x) < FILLER0]
    if name == "pointer":  # links a > b; the target chain starts at START's node
        nxt = {p[i - 1]: p[i + 1] for i in range(1, len(p) - 1) if p[i] == MH.GT}
        heads = [p[p.index(MH.START) + 1]] + [a for a in nxt if a not in nxt.values()
                                               and a != p[p.index(MH.START) + 1]]
        place = {}
        for chain, node in enumerate(heads):
            depth = 0
            while node in nxt:
                place[node], node, depth = (chain, depth), nxt[node], depth + 1
        return tuple(place[p[i - 1]] for i in range(1, len(p) - 1) if p[i] == MH.GT)
    src, var = _sources(prompt)
    target = set()
    while var in src:
        target.add(var)
        var = src[var]

    def depth(v):
        return 0 if src[v] not in src else 1 + depth(src[v])
    return tuple((p[j + 1] in target, depth(p[j + 1])) for j in range(len(p) - 2)
                 if p[j] == MH.LET)


def _depth_from(prompt, root):
    """The length of the chain that starts at variable ``root``."""
    nxt = {s: v for v, s in _sources(prompt)[0].items()}
    var, hops = int(root), 0
    while var in nxt:
        var, hops = nxt[var], hops + 1
    return hops


def test_too_many_hops_for_the_length_is_an_error():
    with pytest.raises(ValueError, match="more than seq_len"):
        MH.multihop_task("var_chain", 9, 32)
    with pytest.raises(ValueError, match="unknown multi-hop task"):
        MH.multihop_task("nope", 5, 48)


def test_increment_chain_answer_is_root_plus_hops():
    task = MH.multihop_task("increment_chain", 5, 48)
    p = task.sample(50, torch.Generator().manual_seed(3))
    rows = torch.arange(50)
    root = p.clean[rows, p.contrast] - NUM0
    assert (p.answer - NUM0 == (root + 5) % NUM_COUNT).all()


def test_the_deep_scale_lays_out_the_multihop_tasks_and_trains_them(tmp_path, monkeypatch):
    from steerops.bench import scales, train
    assert scales.scale_tasks("deep") == list(MH.MULTIHOP)
    task = scales.task_for("pointer", "deep")
    assert task.seq_len == 48 and task.hops == scales.DEEP_CONFIG["num_hidden_layers"] - 1
    with pytest.raises(ValueError, match="runs at the deep scale"):
        scales.task_for("pointer", "standard")
    model, info = train.train_scale_task("var_chain", "deep", 0, max_steps=2, progress=False)
    assert model.config.num_hidden_layers == 6 and info["seq_len"] == 48
    assert info["seeded_init"] is True and info["curriculum"] == "hop-stages"
    assert info["stage_steps"] == [0]  # two steps: no evaluation, still in the first stage
    assert sorted(info["depth_accuracy"]) == ["0", "1", "2", "3", "4", "5"]  # how far it follows
    assert all(0 <= a <= 1 for a in info["depth_accuracy"].values())
    # a model trained before the curriculum is not what the deep recipe trains now
    old = {k: v for k, v in info.items() if k != "curriculum"}
    wanted = dict(scales.recipe("var_chain", "deep"), max_steps=2)
    assert train.same_training(info, wanted) and not train.same_training(old, wanted)


def _hops_of(prompt, name):
    """The target chain's hop count, read off the prompt: its query (pointer) or the
    number of statements of its two chains (h + 1 and h, at least 2: var tasks)."""
    p = [int(x) for x in prompt if int(x) < FILLER0]
    if name == "pointer":
        return p[p.index(QUERY) + 1] - NUM0
    statements = p.count(MH.LET)
    return next(h for h in range(0, 9) if (h + 1) + max(2, h) == statements)


@pytest.mark.parametrize("name", list(MH.MULTIHOP))
def test_the_staged_hop_curriculum_adds_one_lookup_a_stage_and_evaluates_at_h(name):
    from steerops.bench import scales
    task = scales.task_for(name, "deep")
    stages = MH.hop_stages(name, task.hops, task.seq_len)
    first = 1 if name == "pointer" else 0  # a var task's 0 hops: recall the root's value
    # the deep recipe trains through these stages
    assert [(m.seq_len, g and g.hops) for m, g in
            scales.training_stages(name, "deep").tracks[name]] == \
        [(m.seq_len, g and g.hops) for m, g in stages]
    *short, (last, none) = stages
    assert len(short) == task.hops + 1 - first and none is None
    lengths = [mix.seq_len for mix, _ in short]
    assert lengths == sorted(lengths) and lengths[0] < 20 and lengths[-1] <= task.seq_len
    for k, (mix, gate) in enumerate(short, start=first):
        p = mix.sample(200, torch.Generator().manual_seed(k))
        # the shortest length that holds depth k, a few filler tokens to spare
        assert mix.name == task.name and p.clean.shape == (200, mix.seq_len)
        assert mix.seq_len == min(gate.compact_len() + MH.STAGE_SLACK, task.seq_len)
        hops = collections.Counter(_hops_of(row, name) for row in p.clean)
        assert set(hops) == set(range(first, k + 1)) and min(hops.values()) > 15
        for i in range(0, 200, 9):
            assert task.rule(p.clean[i]) == int(p.answer[i])
            assert task.rule(p.corrupt[i]) == int(p.wrong[i])
        assert gate.hops == k and gate.seq_len == mix.seq_len
    # the last stage: every depth at the task's own length, to the target
    p = last.sample(300, torch.Generator().manual_seed(9))
    assert p.clean.shape[1] == task.seq_len
    assert {_hops_of(r, name) for r in p.clean} == set(range(first, task.hops + 1))



def test_the_cli_keeps_a_scales_tasks_apart(capsys):
    from steerops.app.cli import main
    for argv, needle in ((["bench", "attribution", "--scale", "deep", "--tasks", "ioi"],
                          "not tasks of the deep scale"),
                         (["bench", "attribution", "--quick", "--tasks", "pointer"],
                          "not tasks of the toy scale"),
                         (["bench", "attribution", "--quick", "--scale", "deep"],
                          "--quick runs the toy scale")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err


def test_the_multitask_scale_puts_every_task_behind_its_token_on_one_model(tmp_path,
                                                                           monkeypatch):
    from steerops.bench import scales, train
    names = scales.scale_tasks("multitask")
    assert len(names) == 15 and set(MH.MULTIHOP) <= set(names)
    mix = scales.task_for("multitask", "multitask")
    # the 12 as the standard scale lays them out, the multi-hop ones as the deep scale
    # does, each behind its token: one group of pairs per length
    groups = mix.sample_groups(600, torch.Generator().manual_seed(4))
    assert sorted(g.clean.shape[1] for g in groups) == [25, 48]
    assert sum(len(g) for g in groups) == 600
    with pytest.raises(ValueError, match="several lengths"):
        mix.sample(4, torch.Generator())
    ioi = scales.task_for("ioi", "multitask")
    assert ioi.task.seq_len == scales.SCALES["standard"]["seq_len"] == 24
    own = scales.task_for("ioi", "standard").sample(3, torch.Generator().manual_seed(7))
    behind = ioi.sample(3, torch.Generator().manual_seed(7))
    assert torch.equal(behind.clean[:, 1:], own.clean)  # the standard prompts, token first
    assert torch.equal(behind.contrast, own.contrast + 1)
    tokens = torch.cat([g.clean[:, 0] for g in groups])
    assert set(tokens.tolist()) == set(range(scales.TASK_TOKEN0, scales.TASK_TOKEN0 + 15))
    for p in groups:
        assert int(p.clean.max()) < scales.MULTITASK_CONFIG["vocab_size"]
        rows = torch.arange(len(p))
        assert ((p.clean != p.corrupt).sum(1) == 1).all()
        assert (p.clean[rows, p.contrast] != p.corrupt[rows, p.contrast]).all()
        for i in range(0, len(p), 13):  # each row follows its own task's rule
            assert mix.rule(p.clean[i]) == int(p.answer[i])
            assert mix.rule(p.corrupt[i]) == int(p.wrong[i])
    one = scales.task_for("pointer", "multitask")
    q = one.sample(5, torch.Generator().manual_seed(5))
    assert (q.clean[:, 0] == scales.TASK_TOKEN0 + names.index("pointer")).all()
    # every task of a seed gets the one shared model, its accuracy per task recorded
    monkeypatch.setenv("STEEROPS_CACHE", str(tmp_path))
    assert scales.model_name("ioi", "multitask") == "multitask"
    model, info = train.train_scale_task("multitask", "multitask", 0, max_steps=1,
                                         progress=False)
    assert model.config.vocab_size == scales.MULTITASK_CONFIG["vocab_size"]
    assert set(info["task_accuracy"]) == set(names)
    assert scales.task_accuracy(info, "ioi") == info["task_accuracy"]["ioi"]


def test_every_token_of_every_scale_has_text_for_the_pictures():
    """The per-pair heatmap labels positions with their tokens: every id a model of any
    scale can see has short text, the words the generators use read as such, and an id
    outside the vocabulary is an error, not a blank label."""
    from steerops.bench.scales import SCALES, task_token
    from steerops.bench.tasks import SYM0
    from steerops.bench.vocabulary import token_text
    size = SCALES["multitask"]["config"]["vocab_size"]
    texts = [token_text(i) for i in range(size)]
    assert all(texts) and len(set(texts[:FILLER0])) == FILLER0  # distinct below filler
    assert (token_text(NUM0 + 7), token_text(MH.LET), token_text(MH.START), token_text(QUERY),
            token_text(SYM0 + 3), token_text(FILLER0)) == ("7", "let", "START", "?", "s3", "·")
    assert token_text(task_token("var_chain", "multitask")) == "[var_chain]"
    assert size == VOCAB_STANDARD + len(SCALES["multitask"]["tasks"])
    with pytest.raises(ValueError, match="outside"):
        token_text(size)

