"""Trainings that take hours, on a tiny stand-in for the deep scale (2 layers, 24 tokens,
2 hops, a 150-step budget saved every 100): `python -m steerops.bench.train --status`
(where each model's training stands, read from the checkpoints, the resumable states and
the trainers' claims), and several trainers sharing one folder through their claims."""
import os
import re
import subprocess
import sys

import pytest
import torch

from steerops.bench import curriculum, model_store, scales, train
from steerops.bench import reproducible as R
from steerops.bench import training_status as S

TINY_MODEL = dict(model_store.MODEL_CONFIG, hidden_size=32, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                  max_position_embeddings=32)


@pytest.fixture
def tiny_deep(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "is_pinned", lambda: True)  # train here, on the shrunk scale
    # the repository's own deep models stay out of it (test_a_shipped_model_...)
    monkeypatch.setattr(model_store, "CHECKPOINT_DIR", str(tmp_path / "shipped"))
    deep = scales.SCALES["deep"]
    monkeypatch.setitem(scales.SCALES, "deep", dict(
        deep, config=dict(TINY_MODEL, vocab_size=deep["config"]["vocab_size"]), seq_len=24,
        hops=2, max_steps=150, batch_pairs=8, seeds=(0, 1), compiled=False))
    return str(tmp_path)  # (compiled: test_a_compiled_training_resumes_...)


def _path(folder, seed=0):
    return os.path.join(folder, model_store.checkpoint_name("pointer", "deep", seed))


def _cut_short(folder, monkeypatch):
    """Trains pointer seed 0 until its first save (step 100), then dies."""
    real = R.save_state

    def save_then_die(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(R, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_save("pointer", "deep", 0, _path(folder), progress=False)
    monkeypatch.setattr(R, "save_state", real)


def test_a_run_cut_short_is_stopped_then_training_under_a_live_claim(tiny_deep, monkeypatch):
    monkeypatch.setattr(curriculum, "STAGE_GATE", 2.0)
    _cut_short(tiny_deep, monkeypatch)
    stopped = S.model_status("pointer", "deep", 0, tiny_deep)
    assert (stopped.state, stopped.step, stopped.budget) == ("stopped", 100, 150)
    # no gate passes (STAGE_GATE 2); the gate's last accuracy is shown
    assert re.fullmatch(r"stage 1/3 since step 0 \(gate [01]\.\d\d of 2\.00\)", stopped.stages)
    assert 0.0 <= stopped.held_out <= 1.0 and stopped.seconds > 0
    assert "continues on the next run" in stopped.note and "to the budget" in stopped.note
    with open(_path(tiny_deep) + ".training", "w") as f:
        f.write(str(os.getpid()))  # a live process holds the claim
    training = S.model_status("pointer", "deep", 0, tiny_deep)
    assert training.state == "training" and f"pid {os.getpid()}" in training.note
    # a trainer given another budget would set this state aside
    other = S.model_status("pointer", "deep", 0, tiny_deep, max_steps=300)
    assert other.state == "other recipe" and "restarts from step 0" in other.note
    assert S.model_status("pointer", "deep", 1, tiny_deep).state == "not started"


def test_a_finished_model_is_trained_and_judged_by_the_95_percent_rule(tiny_deep, monkeypatch):
    _cut_short(tiny_deep, monkeypatch)
    info = train.train_and_save("pointer", "deep", 0, _path(tiny_deep), progress=False)
    done = S.model_status("pointer", "deep", 0, tiny_deep)
    assert (done.state, done.step, done.held_out) == ("trained", info["steps"],
                                                     info["held_out_accuracy"])
    assert done.note == ("passes the 95% rule" if info["held_out_accuracy"] >= 0.95
                         else "BELOW 95%: excluded")
    monkeypatch.setattr(S, "MIN_ACCURACY", 0.0)
    assert S.model_status("pointer", "deep", 0, tiny_deep).note == "passes the 95% rule"
    # under another recipe now, the checkpoint is retrained on the next run
    monkeypatch.setitem(scales.SCALES, "deep", dict(scales.SCALES["deep"], lr=5e-4))
    assert S.model_status("pointer", "deep", 0, tiny_deep).state == "other recipe"


def test_a_shared_model_lists_the_tasks_below_95_percent():
    info = {"task": "multitask", "held_out_accuracy": 0.97,
            "task_accuracy": dict.fromkeys(scales.SCALES["multitask"]["tasks"], 0.99)}
    assert S._excluded(info, "multitask") == "passes the 95% rule"
    info["task_accuracy"].update(pointer=0.4, ioi=0.9)
    assert S._excluded(info, "multitask") == \
        "BELOW 95% (excluded on this scale): ioi, pointer"


def test_the_cli_shows_every_model_and_trains_nothing(tiny_deep, monkeypatch, capsys):
    _cut_short(tiny_deep, monkeypatch)
    monkeypatch.setattr(train, "train_and_save", lambda *a, **kw: pytest.fail("trained"))
    before = sorted(os.listdir(tiny_deep))
    train.main(["--scale", "deep", "--out", tiny_deep, "--status"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["task", "seed", "state", "step"]
    rows = {tuple(line.split()[:3]) for line in lines[1:]}
    assert ("pointer", "0", "stopped") in rows and ("var_chain", "1", "not") in rows
    assert len(lines) == 1 + 2 * len(scales.scale_tasks("deep"))
    assert sorted(os.listdir(tiny_deep)) == before


def _ship(name, seed, accuracy=0.97):
    """A stand-in for a model bench/ship.py stored in the repository."""
    path = os.path.join(model_store.shipped_dir("deep"),
                        model_store.checkpoint_name(name, "deep", seed))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model_store.save_checkpoint(model_store.build_model(scales.SCALES["deep"]["config"]), dict(
        task=name, steps=1234, max_steps=150, held_out_accuracy=accuracy, train_seconds=60.0),
        path)
    return path


@pytest.fixture
def fake_training(monkeypatch):
    """train_and_save recording what it is asked to train, writing a stand-in file."""
    trained = []

    def fake(name, scale, seed, path, **kw):
        trained.append((name, seed))
        open(path, "w").close()
        return {"held_out_accuracy": 1.0, "steps": 1, "train_seconds": 0.0}
    monkeypatch.setattr(train, "train_and_save", fake)
    threads = torch.get_num_threads()
    yield trained
    torch.set_num_threads(threads)  # main sets --threads


def test_trainers_on_one_folder_skip_a_claimed_model_and_wait_for_it(tiny_deep, fake_training,
                                                                      monkeypatch, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(_path(tiny_deep) + ".training", "w") as f:
            f.write(str(other.pid))  # another live trainer holds pointer seed 0
        waits = []

        def sleep(seconds):  # the other trainer finishes while this one waits
            waits.append(seconds)
            open(_path(tiny_deep), "w").close()
        monkeypatch.setattr(train.time, "sleep", sleep)
        train.main(["--scale", "deep", "--out", tiny_deep, "--seeds", "0", "--no-progress"])
    finally:
        other.kill()
        other.wait()
    assert fake_training == [("var_chain", 0), ("increment_chain", 0)] and len(waits) == 1
    err = capsys.readouterr().err
    assert err.count("waiting for pointer seed 0: another process is training them") == 1
    assert not any(f.endswith(".training") and "pointer" not in f
                   for f in os.listdir(tiny_deep))  # this trainer's claims are gone


def test_a_shipped_model_is_never_trained_again_nor_carried(tiny_deep, fake_training, capsys):
    shipped = _ship("var_chain", 0)
    status = S.model_status("var_chain", "deep", 0, tiny_deep)
    assert (status.state, status.step, status.held_out) == ("shipped", 1234, 0.97)
    assert "passes the 95% rule" in status.note and "in the repository" in status.note
    train.main(["--scale", "deep", "--out", tiny_deep, "--seeds", "0", "--no-progress"])
    assert fake_training == [("pointer", 0), ("increment_chain", 0)]
    assert f"var_chain          seed 0 shipped: {shipped}" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(tiny_deep, model_store.checkpoint_name(
        "var_chain", "deep", 0)))


def test_a_claim_whose_process_is_gone_is_taken_over(tiny_deep, fake_training):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open(_path(tiny_deep) + ".training", "w") as f:
        f.write(str(gone.pid))
    train.main(["--scale", "deep", "--out", tiny_deep, "--seeds", "0", "--tasks", "pointer",
                "--no-progress"])
    assert fake_training == [("pointer", 0)]
    assert not os.path.exists(_path(tiny_deep) + ".training")


def _carry_cli(folder, *extra):
    train.main(["--scale", "deep", "--out", folder, "--tasks", "pointer", "--seeds", "0",
                "--no-progress", *extra])


def test_a_training_carried_to_another_machine_ends_as_an_uninterrupted_one(
        tiny_deep, tmp_path, monkeypatch, capsys):
    first, second, kept, whole = (str(tmp_path / d) for d in ("first", "second", "kept", "whole"))
    os.makedirs(first), os.makedirs(whole)
    _cut_short(first, monkeypatch)
    _carry_cli(first, "--save-progress", kept)
    assert "pointer            seed 0  saved at step 100" in capsys.readouterr().out
    _carry_cli(first, "--save-progress", kept)  # nothing newer: the saved state stays
    assert "kept (step 100, here 100)" in capsys.readouterr().out
    # another machine (another kind of CPU) takes the state up and trains to the end
    _carry_cli(second, "--resume-from", kept, "--status")
    assert "pointer            seed 0  resumes from step 100" in capsys.readouterr().err
    assert S.model_status("pointer", "deep", 0, second).step == 100
    real = R.math_paths
    monkeypatch.setattr(R, "math_paths", lambda: dict(real(), cpu="Another CPU"))
    carried = train.train_and_save("pointer", "deep", 0, _path(second), progress=False)
    here = real()["cpu"]
    assert [(m["cpu"], m["from_step"]) for m in carried["machines"]] == \
        [(here, 0), ("Another CPU", 100)]
    monkeypatch.setattr(R, "math_paths", real)
    uninterrupted = train.train_and_save("pointer", "deep", 0, _path(whole), progress=False)
    assert "machines" not in uninterrupted  # one machine: nothing to say
    a, b = (model_store.load_checkpoint("pointer", folder, scale="deep")[0]
            for folder in (second, whole))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    # once the model is trained, its saved state leaves the carried folder
    _carry_cli(second, "--save-progress", kept)
    assert "trained: its saved state removed" in capsys.readouterr().out
    assert os.listdir(kept) == []


def test_resume_from_leaves_a_live_trainers_model_and_a_state_further_along(tiny_deep,
                                                                             tmp_path, monkeypatch):
    from steerops.bench import training_carry as C
    here, kept = str(tmp_path / "here"), str(tmp_path / "kept")
    os.makedirs(here)
    _cut_short(here, monkeypatch)
    C._copy(_path(here) + ".resume.pt", _path(kept) + ".resume.pt")
    models, untrained = [("pointer", 0), ("var_chain", 0)], lambda name, seed: False
    assert C.resume_from(kept, here, "deep", models, untrained) == \
        [("pointer", 0, "this folder's state is as far (step 100)")]
    with open(_path(here) + ".training", "w") as f:
        f.write(str(os.getppid()))  # a live process (this one's parent) holds it
    os.remove(_path(here) + ".resume.pt")
    assert C.resume_from(kept, here, "deep", models, untrained) == \
        [("pointer", 0, f"left alone: pid {os.getppid()} is training it")]
    assert not os.path.exists(_path(here) + ".resume.pt")


@pytest.mark.parametrize("extra, message", [
    (["--save-progress", "--status"], "--save-progress trains nothing"),
    (["--resume-from", "/no/such/folder"], "--resume-from /no/such/folder: no such folder")])
def test_carry_option_errors_are_one_line(tiny_deep, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        _carry_cli(tiny_deep, *extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_compiled_training_resumes_to_the_uninterrupted_weights(tiny_deep, tmp_path,
                                                                 monkeypatch, one_thread):
    """The deep and multitask scales train compiled, off the pinned paths (scales.py), on
    one thread as the trainer does (compiled code on two threads resumed a few ulp off)."""
    monkeypatch.setitem(scales.SCALES, "deep", dict(scales.SCALES["deep"], compiled=True))
    monkeypatch.setattr(curriculum, "STAGE_GATE", 0.0)  # a new length (graph) at step 100
    assert not scales.pinned("deep") and scales.pinned("standard")
    whole = str(tmp_path / "whole")
    os.makedirs(whole)
    _cut_short(tiny_deep, monkeypatch)
    resumed = train.train_and_save("pointer", "deep", 0, _path(tiny_deep), progress=False)
    uninterrupted = train.train_and_save("pointer", "deep", 0, _path(whole), progress=False)
    assert resumed["compiled"] is True and resumed["steps"] == uninterrupted["steps"] == 150
    assert resumed["stage_steps"] == uninterrupted["stage_steps"] == [0, 100]
    a, b = (model_store.load_checkpoint("pointer", folder, scale="deep")[0]
            for folder in (tiny_deep, whole))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    eager = dict(scales.plan_settings("pointer", "deep", 0), compiled=False)
    assert not model_store.same_training(resumed, eager)  # another plan: retrained


def test_status_points_to_a_state_the_repository_holds(tiny_deep, tmp_path, monkeypatch):
    from steerops.bench import training_carry as C
    monkeypatch.setattr(C, "STATES_DIR", str(tmp_path / "states"))
    _cut_short(tiny_deep, monkeypatch)
    C._copy(_path(tiny_deep) + ".resume.pt",
            os.path.join(C.states_dir("deep"), os.path.basename(_path(tiny_deep)) + ".resume.pt"))
    fresh = str(tmp_path / "fresh")
    status = S.model_status("pointer", "deep", 0, fresh)
    assert status.state == "not started" and status.note == \
        "the repository holds its state at step 100: train with --resume-from"
    assert S.model_status("pointer", "deep", 1, fresh).note == ""


def test_resume_from_without_saved_states_of_the_scale_trains_from_out(
        tiny_deep, tmp_path, monkeypatch, capsys):
    """The default folder (the repository's states of the scale) may not exist yet: the
    first trainer of a scale starts from --out's own states, with a note, not an error."""
    from steerops.bench import training_carry as C
    monkeypatch.setattr(C, "STATES_DIR", str(tmp_path / "no_states_yet"))
    _carry_cli(tiny_deep, "--resume-from", "--status")
    captured = capsys.readouterr()
    assert f"no saved deep states in {tmp_path / 'no_states_yet' / 'deep'}" in captured.err
    assert re.search(r"pointer\s+0\s+not started", captured.out)


@pytest.fixture
def tiny_multitask(tmp_path, monkeypatch):
    """The multitask scale shrunk like the deep one above (2 hops, 24 tokens, 150 steps)."""
    monkeypatch.setattr(R, "is_pinned", lambda: True)
    monkeypatch.setattr(model_store, "CHECKPOINT_DIR", str(tmp_path / "shipped"))
    multi = scales.SCALES["multitask"]
    monkeypatch.setitem(scales.SCALES, "multitask", dict(
        multi, config=dict(TINY_MODEL, vocab_size=multi["config"]["vocab_size"]), seq_len=24,
        hops=2, max_steps=150, batch_pairs=16, seeds=(0, 1), compiled=False))
    return str(tmp_path)


def _task_accuracy_cli(folder, *extra):
    train.main(["--scale", "multitask", "--out", folder, "--no-progress", "--status",
                "--task-accuracy", *extra])


def test_status_shows_each_task_of_a_shared_model_on_its_latest_state(tiny_multitask,
                                                                      monkeypatch, capsys):
    from steerops.bench.model_store import build_model
    real = R.save_state

    def save_then_die(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(R, "save_state", save_then_die)
    path = os.path.join(tiny_multitask, model_store.checkpoint_name("multitask", "multitask", 0))
    with pytest.raises(KeyboardInterrupt):
        train.train_and_save("multitask", "multitask", 0, path, progress=False)
    monkeypatch.setattr(R, "save_state", real)
    _task_accuracy_cli(tiny_multitask)
    out = capsys.readouterr().out
    table = out.split("held-out accuracy per task")[1].strip().splitlines()[1:]
    assert table[0].split() == ["task", "seed", "0", "(saved", "state,", "step", "100)"]
    # what the state's model scores on each task, as a trained model's record measures it
    state = torch.load(path + ".resume.pt", weights_only=True)
    model = build_model(scales.SCALES["multitask"]["config"])
    model.load_state_dict(state["model"])
    expected = train.shared_task_accuracy(model.eval(), "multitask", 0)
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert list(rows) == list(scales.scale_tasks("multitask"))  # seed 1 has no column
    for task, acc in expected.items():
        assert rows[task][0] == f"{acc:.3f}"
        assert (rows[task][1:] == ["<95%"]) == (acc < scales.MIN_ACCURACY)


def test_task_accuracy_with_no_model_and_its_errors(tiny_multitask, tiny_deep, capsys):
    _task_accuracy_cli(tiny_multitask)
    assert "no model of this scale is trained or saved yet" in capsys.readouterr().out
    for argv in (["--scale", "deep", "--status", "--task-accuracy"],
                 ["--scale", "multitask", "--task-accuracy"]):
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--out", tiny_deep])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "--task-accuracy goes with --status on the multitask scale" in err[-1]
