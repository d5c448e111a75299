"""Sweeps and the benchmark over torch.distributed: 2 CPU processes with gloo
(torch.multiprocessing spawn), compared with one process; shards and resuming;
layers on their own devices."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import steerops
from steerops.sweeps import patching
from steerops.sweeps import distributed as D
from steerops.bench import attribution as A
from steerops.bench.tasks import TASKS
from steerops.bench.model_store import load_checkpoint

BENCH_TASKS = ["successor", "pronoun", "ioi"]


@pytest.fixture(autouse=True)
def one_thread():
    """The workers run one thread each; one process compares at the same count (CPU
    kernels may split a reduction differently with another thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs():
    pairs = TASKS["induction"].sample(7, torch.Generator().manual_seed(0))
    return pairs, steerops.logit_diff(pairs.answer, pairs.wrong)


def _sweeps(distributed, shard_dir=None):
    model, _ = load_checkpoint("induction")
    pairs, metric = _inputs()
    sweep = steerops.patching_sweep(model, pairs.clean, pairs.corrupt, metric, progress=False,
                                    distributed=distributed, pairs_per_unit=3,
                                    shard_dir=shard_dir)
    atp = steerops.attribution_patching(model, pairs.clean, pairs.corrupt, metric,
                                        batch_size=2, distributed=distributed)
    return sweep, atp


def _worker(rank, world, tmp, what):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{what}",
                                         rank=rank, world_size=world)
    try:
        if what == "sweeps":
            sweep, atp = _sweeps(True, shard_dir=os.path.join(tmp, "shards"))
            torch.save({"raw": sweep.raw, "effects": sweep.effects, "atp": atp.raw,
                        "atp_scores": atp.scores, "units": sweep.extra["units"]},
                       os.path.join(tmp, f"rank{rank}.pt"))
        else:
            ran, real = [], A.run_one

            def counted(*args, **kwargs):
                ran.append(args[0].name)
                return real(*args, **kwargs)
            A.run_one = counted
            results, _ = A.run(BENCH_TASKS, out_dir=os.path.join(tmp, "bench"), progress=False,
                               with_realistic=False, quick=True, device="cpu")
            with open(os.path.join(tmp, f"{what}{rank}.json"), "w") as f:
                json.dump({"verdict": results["verdict"], "ran": ran,
                           "runs": [r["methods"] for r in results["runs"]]}, f)
    finally:
        torch.distributed.destroy_process_group()


def _spawn(tmp, what, world=2):
    mp.spawn(_worker, args=(world, str(tmp), what), nprocs=world, join=True)


def test_two_process_sweeps_equal_one_process(tmp_path):
    _spawn(tmp_path, "sweeps")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # every rank holds the whole result
    assert torch.equal(r0["raw"], r1["raw"]) and torch.equal(r0["atp"], r1["atp"])
    units = r0["units"]
    assert units["world"] == 2 and sum(units["per_rank"]) == units["count"] == 3 * 3
    assert min(units["per_rank"]) >= 3  # both ranks worked
    # the same units in one process (shards from the 2-process run not reused: other dir)
    one_units, one_atp = _sweeps(False, shard_dir=str(tmp_path / "single"))
    assert torch.equal(r0["raw"], one_units.raw)           # same batches: bitwise
    assert torch.equal(r0["atp"], one_atp.raw)             # same micro-batches: bitwise
    plain, _ = _sweeps(False)                                # all pairs and layers at once
    assert torch.allclose(r0["raw"], plain.raw, atol=1e-5)  # other batches: fp32 rounding
    assert torch.allclose(r0["effects"], plain.effects, atol=1e-5)


def test_two_process_benchmark_equals_one_process(tmp_path):
    _spawn(tmp_path, "bench")
    one, _ = A.run(BENCH_TASKS, out_dir=str(tmp_path / "one"), progress=False,
                   with_realistic=False, quick=True, device="cpu")  # --quick on 3 tasks
    two = [json.loads((tmp_path / f"bench{r}.json").read_text()) for r in (0, 1)]
    assert two[0].pop("ran") == ["successor", "ioi"] and two[1].pop("ran") == ["pronoun"]
    assert two[0] == two[1]                                  # every rank: the whole result
    # R, intervals and FLOP ratios of every reading (no times in the verdict)
    assert two[0]["verdict"] == json.loads(json.dumps(one["verdict"]))
    assert two[0]["runs"] == [r["methods"] for r in one["runs"]]
    data = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert data["complete"] and data["environment"]["world_size"] == 2
    assert data["runs_done"] == len(BENCH_TASKS)
    # resumed with two models' runs missing: the ranks split what is left, one model each
    runs = tmp_path / "bench" / "runs"
    for path in runs.rglob("*.json.gz"):
        if path.name.split("-")[0] in ("successor", "ioi"):
            path.unlink()
    _spawn(tmp_path, "resume")
    again = [json.loads((tmp_path / f"resume{r}.json").read_text()) for r in (0, 1)]
    assert sorted(again[0]["ran"] + again[1]["ran"]) == ["ioi", "successor"]
    assert len(again[0]["ran"]) == len(again[1]["ran"]) == 1
    assert again[0]["runs"] == two[0]["runs"]


def test_killed_sweep_resumes_from_its_shards(tmp_path, monkeypatch):
    """A run killed after its first pair block (3 of 9 units: a block's layers run as
    one sweep): the rerun runs the other 6 and equals an uninterrupted run."""
    model, _ = load_checkpoint("induction")
    pairs, metric = _inputs()
    full = steerops.patching_sweep(model, pairs.clean, pairs.corrupt, metric, progress=False,
                                   pairs_per_unit=3, shard_dir=str(tmp_path / "a"))
    calls, limit = [], [1]
    real = patching.run_group

    def group(plan):  # one pair block's units: its layers
        if len(calls) == limit[0]:
            raise RuntimeError("killed")
        calls.append(len(plan.layers))
        return real(plan)
    monkeypatch.setattr(patching, "run_group", group)
    dies = steerops.patching_sweep
    with pytest.raises(RuntimeError, match="killed"):
        dies(model, pairs.clean, pairs.corrupt, metric, progress=False, pairs_per_unit=3,
             shard_dir=str(tmp_path / "b"))
    assert len(os.listdir(tmp_path / "b")) == 3 and calls == [3]
    calls.clear()
    limit[0] = None
    resumed = dies(model, pairs.clean, pairs.corrupt, metric, progress=False, pairs_per_unit=3,
                   shard_dir=str(tmp_path / "b"))
    assert calls == [3, 3]                                  # only the missing units ran
    assert torch.equal(resumed.raw, full.raw) and torch.equal(resumed.effects, full.effects)
    # single missing units run alone, in a sweep of one layer: a layer's values do not
    # depend on which layers share its sweep
    shards = sorted(os.listdir(tmp_path / "b"))
    for name in (shards[1], shards[5]):
        os.remove(tmp_path / "b" / name)
    calls.clear()
    again = dies(model, pairs.clean, pairs.corrupt, metric, progress=False, pairs_per_unit=3,
                 shard_dir=str(tmp_path / "b"))
    assert calls == [1, 1] and torch.equal(again.raw, full.raw)
    # another model (same architecture) never picks up these shards
    other, _ = load_checkpoint("induction")
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    calls.clear()
    dies(other, pairs.clean, pairs.corrupt, metric, progress=False, pairs_per_unit=3,
         shard_dir=str(tmp_path / "b"))
    assert calls == [3, 3, 3]


def test_units_of_one_block_share_their_base_runs(tmp_path):
    """One block of every pair: the units path is the plain reuse sweep (same batches,
    same forwards), not one sweep (and two base runs) per layer."""
    model, _ = load_checkpoint("induction")
    pairs, metric = _inputs()
    # a split sweep takes the reuse form under reuse='auto' (no timed choice): compare
    # with the reuse sweep by name (one process alone, auto may time its way to plain)
    plain = steerops.patching_sweep(model, pairs.clean, pairs.corrupt, metric, progress=False,
                                    reuse="full")
    units = steerops.patching_sweep(model, pairs.clean, pairs.corrupt, metric, progress=False,
                                    shard_dir=str(tmp_path))
    assert units.extra["plan"]["form"] == "full"
    assert units.extra["units"]["count"] == 3 and len(os.listdir(tmp_path)) == 3
    assert torch.equal(units.raw, plain.raw) and torch.equal(units.effects, plain.effects)
    assert units.forwards == plain.forwards and units.rows == plain.rows


def test_distributed_true_needs_a_process_group():
    model, _ = load_checkpoint("induction")
    pairs, metric = _inputs()
    with pytest.raises(RuntimeError, match="process group"):
        steerops.patching_sweep(model, pairs.clean, pairs.corrupt, metric, distributed=True)
    assert D.active(None) is False and D.rank_world() == (0, 1)


def test_assignment_is_balanced_and_deterministic():
    costs = [5, 1, 4, 2, 3, 3]
    parts = D.assign(costs, 2)
    assert sorted(parts[0] + parts[1]) == list(range(6))
    loads = [sum(costs[i] for i in p) for p in parts]
    assert loads == [9, 9] and D.assign(costs, 2) == parts
    assert D.assign(costs, 1) == [list(range(6))]


# ----------------------------------------------------------------------------- device_map

def test_vectors_go_to_each_layers_own_device():
    """A block on another device (here the meta device, which CPU allows) gets its
    vector there at attach; the other layers keep theirs on the CPU."""
    from steerops.model.blocks import layer_device
    model, _ = load_checkpoint("induction")
    model.model.layers[1].to("meta")
    assert layer_device(model, 2) == torch.device("meta")
    assert layer_device(model, 1) == layer_device(model, 0) == torch.device("cpu")
    v = torch.randn(model.config.hidden_size)
    steering = steerops.Steering(model, [0, 1, 2], v)
    assert steering.vectors[2].device.type == "meta"
    assert steering.vectors[0].device.type == steering.vectors[1].device.type == "cpu"


def test_hooks_work_under_accelerate_device_map():
    """accelerate's dispatch (its hooks wrap every block's forward) with a per-block
    device_map: steering, caching, AtP and the sweep give the undispatched numbers.
    On CPU every entry of the map is the CPU; with GPUs the same code places each
    layer's vector, sources and indices on that layer's device (see README)."""
    accelerate = pytest.importorskip("accelerate")
    model, _ = load_checkpoint("induction")
    ref, _ = load_checkpoint("induction")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(model, device_map=device_map, force_hooks=True)
    assert all(hasattr(model.model.layers[i], "_hf_hook") for i in range(2))
    pairs, metric = _inputs()
    v = torch.randn(model.config.hidden_size)
    with torch.no_grad():
        for m in (model, ref):
            with steerops.Steering(m, [0, 2], v, 2.0, positions=[3]):
                m.out = m(pairs.corrupt).logits
    assert torch.allclose(model.out, ref.out, atol=1e-5)
    assert torch.allclose(steerops.cache_activations(model, pairs.clean).acts,
                          steerops.cache_activations(ref, pairs.clean).acts, atol=1e-5)
    a = steerops.attribution_patching(model, pairs.clean, pairs.corrupt, metric)
    b = steerops.attribution_patching(ref, pairs.clean, pairs.corrupt, metric)
    assert torch.allclose(a.raw, b.raw, atol=1e-4)
    s1 = steerops.patching_sweep(model, pairs.clean, pairs.corrupt, metric, progress=False,
                                 reuse="none")
    s2 = steerops.patching_sweep(ref, pairs.clean, pairs.corrupt, metric, progress=False)
    assert torch.allclose(s1.raw, s2.raw, atol=1e-4)
