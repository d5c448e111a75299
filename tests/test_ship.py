"""Shipped task models (bench/ship.py): a trained checkpoint stored in fp16 in the
repository is what the benchmark then loads, its accuracy measured on the stored weights,
its record saying what it was trained as; the cache is never consulted for it."""
import os

import pytest
import torch
from safetensors.torch import load_file

from steerops.bench import model_store, scales, ship, train


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("STEEROPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_store, "CHECKPOINT_DIR", str(tmp_path / "shipped"))
    return tmp_path


def test_a_shipped_model_is_the_model_the_benchmark_loads(folders, capsys):
    cached = model_store.checkpoint_path("successor", "standard", 0)
    assert cached.startswith(str(folders / "cache"))
    os.makedirs(os.path.dirname(cached))
    trained = train.train_and_save("successor", "standard", 0, cached, max_steps=3,
                                   progress=False)
    ship.main(["--scale", "standard", "--tasks", "successor", "--seeds", "0"])
    assert "held-out accuracy" in capsys.readouterr().out

    path = model_store.checkpoint_path("successor", "standard", 0)
    assert path == str(folders / "shipped" / "standard" / "successor-seed0.safetensors")
    stored, source = load_file(path), load_file(cached)
    assert all(v.dtype == torch.float16 for v in stored.values())
    info = model_store.read_info(path)
    assert info["stored_dtype"] == "float16"
    assert info["trained_sha256"] == model_store.weights_sha256(cached)
    assert info["trained_held_out_accuracy"] == trained["held_out_accuracy"]
    assert 0.0 <= info["held_out_accuracy"] <= 1.0

    # the benchmark's loader takes the shipped file, in float32, equal to the stored fp16
    model, loaded = train.ensure_checkpoint("successor", "standard", 0, progress=False)
    assert loaded["weights_sha256"] == model_store.weights_sha256(path)
    for name, p in model.state_dict().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, stored[name].float())
        assert torch.equal(p, source[name].half().float())
    assert scales.task_accuracy(loaded, "successor") == info["held_out_accuracy"]

    # a shipped model is never retrained or removed, even when today's recipe differs
    os.remove(cached)
    recipe = scales.recipe
    scales.recipe = lambda *a: dict(recipe(*a), lr=1.0)
    try:
        again, _ = train.ensure_checkpoint("successor", "standard", 0, progress=False)
    finally:
        scales.recipe = recipe
    assert os.path.exists(path) and not os.path.exists(cached)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))


def test_nothing_to_ship_and_wrong_tasks_are_one_line_errors(folders, capsys):
    with pytest.raises(SystemExit, match="nothing to ship: no trained deep model"):
        ship.main(["--scale", "deep", "--tasks", "pointer", "--seeds", "0"])
    with pytest.raises(SystemExit) as e:
        ship.main(["--scale", "deep", "--tasks", "ioi"])
    assert e.value.code == 2
    assert "--tasks ioi: not tasks of the deep scale" in capsys.readouterr().err


def test_a_shipped_multihop_model_records_how_far_along_the_chain_it_follows(folders):
    cached = model_store.checkpoint_path("pointer", "deep", 0)
    os.makedirs(os.path.dirname(cached))
    trained = train.train_and_save("pointer", "deep", 0, cached, max_steps=1, progress=False)
    ship.main(["--scale", "deep", "--tasks", "pointer", "--seeds", "0"])
    info = model_store.read_info(model_store.checkpoint_path("pointer", "deep", 0))
    # measured again on the stored weights, depth by depth (pointer: 1..5 lookups)
    assert sorted(info["depth_accuracy"]) == sorted(trained["depth_accuracy"]) == \
        ["1", "2", "3", "4", "5"]
    assert info["stored_dtype"] == "float16"
