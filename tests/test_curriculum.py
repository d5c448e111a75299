"""Training curricula (bench/curriculum.py): one track draws exactly what plain training
draws, many tracks share a batch by their weights and come back grouped by length, and
each track moves on at its own gate."""
import pytest
import torch

from steerops.bench import curriculum as C
from steerops.bench import multihop as MH
from steerops.bench import scales
from steerops.bench.spread import task_at


def test_one_track_draws_what_plain_training_draws():
    task = MH.multihop_task("pointer", 2, 24)
    single = C.Curriculum.single(task)
    (ids, labels), = single.batch(16, torch.Generator().manual_seed(5))
    want_ids, want_labels = C.examples(task, 16, torch.Generator().manual_seed(5))
    assert torch.equal(ids, want_ids) and torch.equal(labels, want_labels)
    assert single.progress() == {} and single.state() == {"stage": 0, "stage_steps": [0]}
    assert single.where() == ""  # nothing staged
    staged = C.Curriculum.single(task, MH.hop_stages("pointer", 2, 24))
    staged.advance(300, lambda gate: 1.0)
    assert staged.where() == "stage 2/3 since step 300"


def test_a_stage_below_its_gate_shows_how_far_it_got_and_keeps_it_when_saved():
    task = MH.multihop_task("pointer", 2, 24)
    staged = C.Curriculum.single(task, MH.hop_stages("pointer", 2, 24))
    staged.advance(100, lambda gate: 0.4123)
    assert staged.where() == "stage 1/3 since step 0 (gate 0.41 of 0.90)"
    assert staged.progress() == {"stage": "0", "gate": "0.41"}
    saved = staged.state()
    assert saved == {"stage": 0, "stage_steps": [0], "gate_accuracy": 0.4123}
    again = C.Curriculum.single(task, MH.hop_stages("pointer", 2, 24))
    again.load(saved)
    assert again.where() == staged.where()
    staged.advance(200, lambda gate: 0.95)  # passes: the next gate is not measured yet
    assert staged.where() == "stage 2/3 since step 200" and "gate" not in staged.state()
    again.load({"stage": 1, "stage_steps": [0, 200]})  # saved before gates were kept
    assert again.where() == "stage 2/3 since step 200" and again.progress() == {"stage": "1"}


def test_many_tracks_share_a_batch_by_weight_grouped_by_length():
    short, long_ = task_at("ioi", 16), task_at("sorting", 24)
    cur = C.Curriculum({"ioi": [(short, None)], "sorting": [(long_, None)]},
                       weights={"ioi": 3.0, "sorting": 1.0})
    groups = cur.batch(2000, torch.Generator().manual_seed(1))
    by_len = {ids.shape[1]: (ids, labels) for ids, labels in groups}
    assert sorted(by_len) == [16, 24]
    n16, n24 = len(by_len[16][1]) // 2, len(by_len[24][1]) // 2  # clean and corrupt rows
    assert n16 + n24 == 2000 and abs(n16 / 2000 - 0.75) < 0.04
    for ids, labels in by_len.values():  # every row is its task's, answered by its rule
        task = short if ids.shape[1] == 16 else long_
        assert all(task.rule(ids[i]) == int(labels[i]) for i in range(0, len(ids), 37))


def test_each_track_moves_on_at_its_own_gate_and_the_state_round_trips():
    a = MH.hop_stages("pointer", 2, 24)
    b = MH.hop_stages("var_chain", 1, 24)
    cur = C.Curriculum({"pointer": a, "var_chain": b})
    passing = {id(a[0][1])}  # only pointer's first gate passes
    cur.advance(100, lambda gate: 1.0 if id(gate) in passing else 0.0)
    assert cur.state() == {"stage": {"pointer": 1, "var_chain": 0},
                           "stage_steps": {"pointer": [0, 100], "var_chain": [0]},
                           "gate_accuracy": {"var_chain": 0.0}}
    assert cur.current("pointer") is a[1][0]
    assert cur.where() == (f"pointer 2/{len(a)} since 100, var_chain 1/{len(b)} since 0 "
                           "(gate 0.00 of 0.90)")
    assert cur.progress() == {"stage": "1/0", "gate": "-/0.00"}  # pointer's new gate: unmeasured
    assert cur.state()["gate_accuracy"] == {"var_chain": 0.0}
    cur.advance(200, lambda gate: 1.0)  # every gate passes; a last stage stays
    assert cur.last_stage_since() is None  # var_chain is not in its last stage yet
    cur.advance(300, lambda gate: 1.0)
    assert cur.state()["stage"] == {"pointer": 2, "var_chain": 2}
    assert cur.last_stage_since() == 300  # the step the last track got there
    assert C.Curriculum.single(MH.multihop_task("pointer", 2, 24)).last_stage_since() == 0
    again = C.Curriculum({"pointer": a, "var_chain": b})
    again.load(cur.state())
    assert again.state() == cur.state()
    with pytest.raises(ValueError, match="at least one track"):
        C.Curriculum({"pointer": []})


def test_the_multitask_curriculum_stages_each_multihop_task_behind_its_token():
    cur = scales.training_stages("multitask", "multitask")
    spec = scales.SCALES["multitask"]
    assert list(cur.tracks) == list(spec["tasks"])
    for name, stages in cur.tracks.items():
        token = scales.task_token(name, "multitask")
        if name not in MH.MULTIHOP:  # the 12: the standard layout behind the token, from the start
            (task, gate), = stages
            assert gate is None and task.seq_len == 25 and task.token == token
            continue
        # the deep scale's stages, one position longer for the token, gated on their own
        deep = MH.hop_stages(name, spec["hops"], 47)
        assert [(t.seq_len, g and g.seq_len) for t, g in stages] == \
            [(t.seq_len + 1, g and g.seq_len + 1) for t, g in deep]
        assert all(t.token == token and (g is None or g.token == token) for t, g in stages)
    hop = sum(w for n, w in cur.weights.items() if n in MH.MULTIHOP)
    assert abs(hop - spec["multihop_share"]) < 1e-12 and abs(sum(cur.weights.values()) - 1) < 1e-12
    groups = cur.batch(64, torch.Generator().manual_seed(0))
    lengths = sorted(ids.shape[1] for ids, _ in groups)
    assert 25 in lengths and lengths[0] < 20  # the multi-hop tasks start short
    for ids, labels in groups:  # each row behind its task's token, answered by its rule
        for i in range(0, len(ids), 11):
            name = spec["tasks"][int(ids[i, 0]) - scales.TASK_TOKEN0]
            assert cur.current(name).rule(ids[i]) == int(labels[i])
            assert scales.task_for(name, "multitask").rule(ids[i]) == int(labels[i])
    assert scales.training_stages("ioi", "standard") is None


def test_a_mixture_of_lengths_is_evaluated_over_all_its_rows():
    from steerops.bench import model_store
    from steerops.bench.multitask import Mixture
    from steerops.bench.spread import VOCAB_STANDARD
    from steerops.bench.trainer import accuracy
    tasks = [task_at("ioi", 16), task_at("sorting", 24), task_at("successor", 16)]
    mix = Mixture(tasks)
    groups = mix.sample_groups(300, torch.Generator().manual_seed(3))
    assert sorted(g.clean.shape[1] for g in groups) == [16, 24]
    assert sum(len(g) for g in groups) == 300
    model = model_store.build_model(dict(model_store.MODEL_CONFIG, hidden_size=32,
                                         intermediate_size=64, num_attention_heads=2,
                                         num_key_value_heads=2, vocab_size=VOCAB_STANDARD))
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for g in mix.sample_groups(50, torch.Generator().manual_seed(9)):
            ids, labels = C.rows(g)
            hits += int((model(ids).logits[:, -1].argmax(-1) == labels).sum())
            total += len(labels)
    assert total == 100 and accuracy(model, mix, 50, 9) == pytest.approx(hits / total)
