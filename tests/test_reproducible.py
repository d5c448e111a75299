"""Reproducible task models (docs/protocol.md, "Reproducible models"): the benchmark's
own seeded initialisation, pinned CPU math paths, and training that resumes bit for bit."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from steerops.bench import curriculum
from steerops.bench import multihop as MH
from steerops.bench import reproducible as R
from steerops.bench import train
from steerops.bench import model_store
from steerops.bench.spread import VOCAB_STANDARD
from steerops.bench.tasks import TASKS

SMALL = dict(model_store.MODEL_CONFIG, hidden_size=32, intermediate_size=64, num_attention_heads=2,
             num_key_value_heads=2)


def _digest(model):
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_seeded_init_is_the_seed_alone_and_spreads_as_stated():
    a = R.seeded_init(model_store.build_model(SMALL), 3)
    torch.manual_seed(99)  # torch's global stream plays no part
    b = R.seeded_init(model_store.build_model(SMALL), 3)
    c = R.seeded_init(model_store.build_model(SMALL), 4)
    assert _digest(a) == _digest(b) != _digest(c)
    w = a.model.embed_tokens.weight
    assert abs(float(w.std()) - R.INIT_STD) < 0.1 * R.INIT_STD
    assert float(w.abs().max()) < R.INIT_STD * 3 ** 0.5
    assert all(float(n.weight.min()) == 1.0 for n in [a.model.norm, a.model.layers[0].input_layernorm])


def test_uniform_values_are_exact_arithmetic_of_the_integers():
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 1 << 24, (1000,), generator=torch.Generator().manual_seed(0))
    u = R.uniform_like((1000,), 0.5, g)
    expected = ((2 * k + 1 - (1 << 24)).double() / (1 << 24) * 0.5).float()
    assert torch.equal(u, expected) and float(u.abs().max()) < 0.5


def _train_small(resume_path=None):
    return train.train_task(TASKS["successor"], seed=1, max_steps=6, batch_pairs=8,
                            eval_every=2, target=2.0, progress=False, config=SMALL,
                            seeded_init=True, resume_path=resume_path)


def test_training_cut_short_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole, info = _train_small()
    assert info["seeded_init"] and info["math_paths"]["threads"] == torch.get_num_threads()
    path = str(tmp_path / "state.pt")
    real_save, saves = R.save_state, []

    def save_then_die(*a, **kw):
        real_save(*a, **kw)
        saves.append(kw["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed right after its second save (step 4)
    monkeypatch.setattr(R, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train_small(path)
    assert saves == [2, 4] and os.path.exists(path)
    monkeypatch.setattr(R, "save_state", real_save)
    resumed, rinfo = _train_small(path)
    assert rinfo["steps"] == 6 and not os.path.exists(path)  # the state file is gone at the end
    assert _digest(resumed) == _digest(whole)


STAGED = dict(SMALL, vocab_size=VOCAB_STANDARD, max_position_embeddings=24)


def _train_staged(resume_path=None):
    return train.train_task(MH.multihop_task("pointer", 2, 24), seed=1, max_steps=6,
                            batch_pairs=8, eval_every=2, target=2.0, progress=False,
                            config=STAGED, seeded_init=True, resume_path=resume_path,
                            curriculum="hop-stages", stages=MH.hop_stages("pointer", 2, 24))


def test_a_curriculum_moves_on_at_its_gate_and_resumes_in_its_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(curriculum, "STAGE_GATE", 2.0)  # no gate can pass
    _, stays = _train_staged()
    assert stays["stage_steps"] == [0] and stays["curriculum"] == "hop-stages"
    monkeypatch.setattr(curriculum, "STAGE_GATE", -1.0)  # every gate passes at its first check
    whole, info = _train_staged()
    # stages: 1 hop (short), 2 hops (short), every depth at full length; one per evaluation
    assert info["stage_steps"] == [0, 2, 4]
    path = str(tmp_path / "state.pt")
    real_save, saves = R.save_state, []

    def save_then_die(*a, **kw):
        real_save(*a, **kw)
        saves.append(kw["extra"]["stage"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed at step 4, as the last stage begins
    monkeypatch.setattr(R, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train_staged(path)
    monkeypatch.setattr(R, "save_state", real_save)
    resumed, rinfo = _train_staged(path)
    assert saves == [1, 2] and rinfo["stage_steps"] == [0, 2, 4]
    assert _digest(resumed) == _digest(whole)


def test_a_state_saved_under_another_plan_is_set_aside_not_continued(tmp_path, monkeypatch,
                                                                    capsys):
    path = str(tmp_path / "state.pt")
    real_save = R.save_state

    def save_once_then_die(*a, **kw):
        real_save(*a, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(R, "save_state", save_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train_small(path)  # leaves a state at step 2 under lr 3e-3
    monkeypatch.setattr(R, "save_state", real_save)

    def other(resume_path=None):  # the same run at another learning rate
        return train.train_task(TASKS["successor"], seed=1, max_steps=6, batch_pairs=8,
                                eval_every=2, target=2.0, progress=False, config=SMALL,
                                seeded_init=True, resume_path=resume_path, lr=1e-3)
    fresh, _ = other()
    restarted, info = other(path)
    assert "another training plan" in capsys.readouterr().err
    assert os.path.exists(path + ".stale") and not os.path.exists(path)
    assert info["steps"] == 6 and _digest(restarted) == _digest(fresh)
    with pytest.raises(TypeError):
        train.train_task(TASKS["successor"], max_step=3)  # a misspelt setting is an error



# The weights of bench/repro_check's small model, trained pinned, depend on the CPU: MKL
# honours MKL_CBWR=AVX2 on Intel CPUs only (on AMD it falls back to its AUTO branch), so
# one recorded digest cannot hold on every machine CI lands on (Xeon: 415ca8ea...,
# AMD EPYC: 6793594...). What must hold everywhere: the same weights from two pinned
# processes, here, and from every CI environment on one machine (both ends of the
# transformers range, both ends of the torch range), which .ci/run checks by running
# `python -m steerops.bench.repro_check` in each of its three environments.
def test_pinned_training_gives_the_same_weights_in_two_pinned_processes():
    from steerops.bench import repro_check
    first = repro_check.pinned_digest()
    assert len(first) == 64 and repro_check.pinned_digest() == first


def test_the_pinned_child_process_is_pinned():
    argv, env = R.pinned_command(["steerops.bench.reproducible"])
    code = ("import torch; from steerops.bench import reproducible as R; "
            "print(R.is_pinned(), torch.backends.cpu.get_cpu_capability())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["True", "AVX2"]


def test_a_state_saved_before_the_loop_kept_its_own_state_loads_with_the_default(tmp_path):
    model = model_store.build_model(SMALL)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    parts = dict(model=model, opt=opt, sched=sched, gen=gen)
    path = str(tmp_path / "state.pt")
    R.save_state(path, step=7, held_out=0.5, elapsed=3.0, plan={"lr": 1}, extra={"stage": 2},
                 **parts)
    assert R.load_state(path, plan={"lr": 1}, extra={"stage": 0}, **parts)[3] == {"stage": 2}
    state = torch.load(path, weights_only=True)
    del state["extra"]  # as written before save_state took ``extra``
    torch.save(state, path)
    assert R.load_state(path, plan={"lr": 1}, extra={"stage": 0}, **parts) == \
        (7, 0.5, 3.0, {"stage": 0}, [])


def _train_tracks(resume_path=None):
    tracks = curriculum.Curriculum({"pointer": MH.hop_stages("pointer", 2, 24),
                                    "var_chain": MH.hop_stages("var_chain", 1, 24)},
                                   weights={"pointer": 1.0, "var_chain": 3.0})
    return train.train_task(MH.multihop_task("pointer", 2, 24), seed=2, max_steps=6,
                            batch_pairs=8, eval_every=2, target=2.0, progress=False,
                            config=STAGED, seeded_init=True, resume_path=resume_path,
                            curriculum="hop-stages", multihop_share=1.0, stages=tracks)


def test_a_curriculum_of_many_tracks_trains_on_mixed_lengths_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(curriculum, "STAGE_GATE", -1.0)  # every gate passes at its first check
    whole, info = _train_tracks()
    # each track's stages, one per evaluation (var_chain 1 hop: 0, 1 hops, then full length)
    assert info["stage_steps"] == {"pointer": [0, 2, 4], "var_chain": [0, 2, 4]}
    assert info["multihop_share"] == 1.0
    path = str(tmp_path / "state.pt")
    real_save, saves = R.save_state, []

    def save_then_die(*a, **kw):
        real_save(*a, **kw)
        saves.append(dict(kw["extra"]["stage"]))
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed at step 2, both tracks in their second stage
    monkeypatch.setattr(R, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train_tracks(path)
    monkeypatch.setattr(R, "save_state", real_save)
    resumed, rinfo = _train_tracks(path)
    assert saves == [{"pointer": 1, "var_chain": 1}] and rinfo["stage_steps"] == info["stage_steps"]
    assert _digest(resumed) == _digest(whole)


@pytest.mark.parametrize("decay, want", [
    # warm-up (s + 1) / 100 at steps 2, 4, 6, 8; the stages begin at steps 2 and 4
    ("last-stage", [0.03, 0.05, 0.07 * 0.5, 0.09 * 0.1]),  # falls from step 4 on
    (True, [0.03 * 0.75, 0.05 * 0.5, 0.07 * 0.25, 0.09 * 0.1])])  # falls from step 0 on
def test_the_rate_falls_from_the_last_stage_on_and_resumes_exactly(decay, want, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(curriculum, "STAGE_GATE", -1.0)  # every gate passes at its first check
    lrs = []
    real_save = R.save_state

    def recorded(*a, **kw):
        real_save(*a, **kw)
        lrs.append(kw["sched"].get_last_lr()[0])

    def run(path=None):
        return train.train_task(MH.multihop_task("pointer", 2, 24), seed=1, max_steps=8,
                                batch_pairs=8, eval_every=2, target=2.0, progress=False,
                                config=STAGED, seeded_init=True, resume_path=path, lr=1.0,
                                decay=decay, curriculum="hop-stages",
                                stages=MH.hop_stages("pointer", 2, 24))
    monkeypatch.setattr(R, "save_state", recorded)
    whole, info = run(str(tmp_path / "a.pt"))
    assert info["stage_steps"] == [0, 2, 4] and info["decay"] == decay
    assert lrs == pytest.approx(want)

    def save_then_die(*a, **kw):
        real_save(*a, **kw)
        if kw["step"] == 4:
            raise KeyboardInterrupt  # killed as the last stage begins
    monkeypatch.setattr(R, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "b.pt"))
    monkeypatch.setattr(R, "save_state", real_save)
    resumed, _ = run(str(tmp_path / "b.pt"))
    assert _digest(resumed) == _digest(whole)
