"""The deep and multitask scales end to end: from no model to results.json, through
training (the scale's curriculum), the checkpoint's record and the attribution run, on
tiny stand-ins for the scales' models (2 layers, 24 tokens, 2 hops, 3 steps; the real ones
train for hours). A 3-step model gets no pair right, so here every pair counts as usable
and the 95% rule is off: what is tested is the way through, not a verdict."""
import pytest
import torch

from steerops.bench import attribution as A
from steerops.bench import evaluate as E
from steerops.bench import model_store, scales, train
from steerops.bench import reproducible as R
from steerops.bench.multihop import MULTIHOP

TINY_MODEL = dict(model_store.MODEL_CONFIG, hidden_size=32, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                  max_position_embeddings=32)
SETTINGS = dict(n_fit=8, n_val=4, n_eval=6, s2_steps=2, n_boot=8, n_boot_hier=40, repeats=0,
                split_seeds=1, realistic_pairs=1, realistic_pairs_1b=0)


@pytest.fixture
def tiny_scales(tmp_path, monkeypatch):
    """The deep and multitask scales shrunk; trained in this process (pinned or not:
    the pinned child would not see the shrunk scales); every model counts (95% rule off)."""
    monkeypatch.setenv("STEEROPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_store, "CHECKPOINT_DIR", str(tmp_path / "shipped"))
    monkeypatch.setattr(R, "is_pinned", lambda: True)
    monkeypatch.setattr(A, "MIN_ACCURACY", 0.0)

    def every_pair_usable(task, model, n_fit, n_val, n_eval, seed, device):
        pool = task.sample(n_fit + n_val + n_eval, torch.Generator().manual_seed(seed))
        cuts = [0, n_fit, n_fit + n_val, n_fit + n_val + n_eval]
        return {name: pool.select(torch.arange(cuts[i], cuts[i + 1]))
                for i, name in enumerate(("fit", "val", "eval"))}, 1.0
    monkeypatch.setattr(E, "make_splits", every_pair_usable)
    deep = scales.SCALES["deep"]
    monkeypatch.setitem(scales.SCALES, "deep", dict(
        deep, config=dict(TINY_MODEL, vocab_size=deep["config"]["vocab_size"]), seq_len=24,
        hops=2, max_steps=3, batch_pairs=8, seeds=(0,), compiled=False))
    multi = scales.SCALES["multitask"]
    monkeypatch.setitem(scales.SCALES, "multitask", dict(
        multi, config=dict(TINY_MODEL, vocab_size=multi["config"]["vocab_size"]), seq_len=24,
        hops=2, max_steps=3, batch_pairs=16, seeds=(0,), compiled=False))
    trained = []
    real = train.train_and_save

    def counted(name, scale, seed, path, **kw):
        trained.append((name, scale))
        return real(name, scale, seed, path, **kw)
    monkeypatch.setattr(train, "train_and_save", counted)
    return trained


def test_the_deep_scale_trains_its_staged_models_and_runs_them(tiny_scales, tmp_path):
    results, table = A.run(["pointer", "var_chain"], out_dir=str(tmp_path / "deep"),
                           progress=False, with_realistic=False,
                           settings=dict(SETTINGS, scale="deep"))
    assert sorted(tiny_scales) == [("pointer", "deep"), ("var_chain", "deep")]
    assert results["complete"] and results["runs_done"] == 2 and not results["partial"]
    for r in results["runs"]:
        assert r["scale"] == "deep" and r["model"]["config"]["num_hidden_layers"] == 2
    assert set(results["tasks"]) == {"pointer", "var_chain"}
    # both are multi-hop tasks: the family the verdict reads them in
    assert sorted(results["families"]["multihop"]["tasks"]) == ["pointer", "var_chain"]
    info = train.checkpoint_info("pointer", "deep", 0)
    assert info["curriculum"] == "hop-stages" and info["stage_steps"] == [0]
    assert sorted(info["depth_accuracy"]) == ["1", "2"]


def test_the_multitask_scale_trains_one_model_and_runs_every_task_on_it(tiny_scales, tmp_path):
    tasks = ["ioi", "pointer"]
    results, _ = A.run(tasks, out_dir=str(tmp_path / "multi"), progress=False,
                       with_realistic=False, settings=dict(SETTINGS, scale="multitask"))
    assert tiny_scales == [("multitask", "multitask")]  # one model for every task
    assert results["complete"] and results["runs_done"] == 2
    hashes = {r["model"]["weights_sha256"] for r in results["runs"]}
    assert len(hashes) == 1
    info = train.checkpoint_info("multitask", "multitask", 0)
    assert set(info["task_accuracy"]) == set(scales.scale_tasks("multitask"))
    assert info["multihop_share"] == scales.SCALES["multitask"]["multihop_share"]
    # every multi-hop task's stages recorded by name
    assert set(MULTIHOP) <= set(info["stage_steps"])
    run = {r["task"]: r for r in results["runs"]}
    assert set(run) == set(tasks)
    # the 12 at the standard layout and the multi-hop ones at the scale's length, each
    # behind its token: the token leads, never the contrast
    assert run["ioi"]["seq_len"] == 25 and run["pointer"]["seq_len"] == 24
    assert all(min(r["contrast_positions"]) >= 1 for r in run.values())
    assert run["pointer"]["family"] == "multihop"


def test_a_scale_whose_every_model_is_excluded_reports_no_verdict_and_combines(
        tiny_scales, tmp_path, monkeypatch, capsys):
    import glob
    import json
    import os
    import shutil

    from steerops.bench import combine as C
    from steerops.bench.run_store import COMMITTED, shard_path
    monkeypatch.setattr(A, "MIN_ACCURACY", 0.95)  # the rule on: no 3-step model passes it
    deep = str(tmp_path / "deep")
    assert A.main(["--scale", "deep", "--tasks", "pointer", "--out", deep, "--no-realistic",
                   "--no-progress", "--train-seeds", "0"]) == 0
    out, err = capsys.readouterr()
    assert "No verdict at this scale: every task model (1) is below 95%" in out
    # one task and one seed of the deep scale's run: said before the no-verdict line
    assert out.index("**Scope: a subset of the deep scale's run**: tasks pointer of ") < \
        out.index("No verdict at this scale")
    assert "Excluded: pointer training seed 0" in out and "no verdict" in err
    record = json.load(open(os.path.join(deep, "results.json")))
    assert record["runs_done"] == 0 and record["complete"] and record["verdict"] is None
    assert [e["task"] for e in record["excluded_models"]] == ["pointer"]
    assert sorted(record["excluded_models"][0]["depth_accuracy"]) == ["1", "2"]
    assert "by depth, 1-2 hops: " in out  # how far along its chains it got
    # combined with a scale that has runs (the committed standard ioi shards)
    with open(COMMITTED) as f:
        settings = json.load(f)["settings"]
    standard = tmp_path / "standard"
    runs_dir = os.path.dirname(shard_path(str(standard), settings, "x", 0, 0))
    os.makedirs(runs_dir)
    for p in glob.glob(os.path.join(os.path.dirname(shard_path(
            os.path.dirname(COMMITTED), settings, "x", 0, 0)), "ioi-train0-*.json.gz")):
        shutil.copy(p, runs_dir)
    (standard / "results.json").write_text(json.dumps({"settings": settings}))
    both = C.combine([str(standard), deep], n_draws=20)
    assert both["scales_without_verdict"] == ["deep"] and both["runs_per_scale"]["deep"] == 0
    assert "scale deep" not in both["v4"]["families"]
    table = C.markdown(both)
    assert "No verdict at the deep scale" in table and "Excluded at deep: pointer seed 0" in table
    with pytest.raises(C.UsageError, match="every task model of every scale"):
        C.combine([deep], n_draws=20)
