"""`steerops bench combine` (bench/combine.py): the v4 verdict per scale and together from
several benchmark folders' shards, tasks named scale/task, one family per scale."""
import glob
import json
import os
import re
import shutil

import pytest

from steerops.bench import combine as C
from steerops.bench.aggregate import summarize
from steerops.bench.provenance import read_shard
from steerops.bench.run_store import COMMITTED, shard_path

TASKS = ("agreement", "ioi")  # one discriminative task, one not (committed v4 standard runs)


def _folder(tmp_path, scale, settings, shards):
    """A benchmark folder of ``scale`` holding copies of ``shards``."""
    folder = tmp_path / scale
    settings = dict(settings, scale=scale)
    runs_dir = os.path.dirname(shard_path(str(folder), settings, "x", 0, 0))
    os.makedirs(runs_dir)
    for path in shards:
        shutil.copy(path, runs_dir)
    (folder / "results.json").write_text(json.dumps({"settings": settings}))
    return str(folder)


@pytest.fixture(scope="module")
def committed():
    with open(COMMITTED) as f:
        settings = json.load(f)["settings"]
    runs_dir = os.path.dirname(shard_path(os.path.dirname(COMMITTED), settings, "x", 0, 0))
    # shards only (a rerun's set-aside NAME.other-model files sit beside them)
    shards = sorted(p for t in TASKS
                    for p in glob.glob(os.path.join(runs_dir, f"{t}-train0-*.json.gz")))
    assert len(shards) == 6
    return settings, shards


def test_each_scale_alone_equals_its_own_summary_and_together_pools_them(tmp_path, committed,
                                                                         capsys):
    settings, shards = committed
    alone = summarize([read_shard(p) for p in shards], 100, C.SEED)
    # the same runs standing in for a second scale: each scale's family must equal the
    # scale alone, and together (two equal halves) must equal it too
    folders = [_folder(tmp_path, s, settings, shards) for s in ("standard", "deep")]
    assert C.main(folders + ["--out", str(tmp_path / "both"), "--draws", "100"]) == 0
    table = capsys.readouterr().out
    both = json.load(open(tmp_path / "both" / "results.json"))
    assert both["scales"] == ["standard", "deep"] and both["runs_per_scale"] == {
        "standard": 6, "deep": 6}
    assert set(both["tasks"]) == {f"{s}/{t}" for s in ("standard", "deep") for t in TASKS}
    fams = both["v4"]["families"]
    basis = alone["v4"]["families"]["all"]["tasks"]  # the discriminative tasks
    assert fams["scale standard"]["tasks"] == [f"standard/{t}" for t in basis]
    for method, row in alone["v4"]["families"]["all"]["rows"].items():
        for fam in ("scale standard", "scale deep", "all"):
            assert fams[fam]["rows"][method]["R_pair"] == pytest.approx(row["R_pair"],
                                                                        rel=1e-12)
    assert "standard + deep together" in table and "Family `scale deep`" in table
    for png in ("plane.png", "answer_column_share.png"):
        assert (tmp_path / "both" / png).stat().st_size > 10_000


def test_the_together_charts_wrap_onto_rows(tmp_path, committed, monkeypatch):
    """Together, the plane has the families plus one per scale (7 with all three scales):
    it wraps them onto rows of at most PLANE_COLUMNS panels per form instead of one row
    too wide to read. Here 4 families on rows of 3: two rows per form, four in all. The
    answer-column share chart has one row of bars per scale, as wide as one scale's."""
    from PIL import Image

    from steerops.bench import plots_v4
    settings, shards = committed
    folders = [_folder(tmp_path, s, settings, shards) for s in ("standard", "deep")]
    both = C.combine(folders, n_draws=50)
    assert len(both["v4"]["families"]) == 4
    monkeypatch.setattr(plots_v4, "PLANE_COLUMNS", 3)
    plots_v4.plot_plane_v4(both, tmp_path / "plane.png")
    width, height = Image.open(tmp_path / "plane.png").size
    assert width == pytest.approx((5.0 * 3 + plots_v4.LEGEND_INCHES) * 110, abs=2)
    assert height == pytest.approx(4 * 4.3 * 110, abs=2)
    plots_v4.plot_shares(both, tmp_path / "shares.png")
    alone = dict(both, tasks={t: r for t, r in both["tasks"].items() if t.startswith("deep/")})
    plots_v4.plot_shares(alone, tmp_path / "one_scale.png")
    (width, height), (width_1, height_1) = (Image.open(tmp_path / p).size
                                            for p in ("shares.png", "one_scale.png"))
    assert width == pytest.approx(width_1, abs=40) and height > 1.6 * height_1


def test_the_same_task_on_two_scales_is_set_side_by_side(tmp_path, committed):
    """A task on two scales (here the same runs standing in for both) gets one row per
    scale with that scale's own values, in the command's order; identical runs give
    identical rows and no interval apart. A task on one scale only has no row."""
    settings, shards = committed
    standard, multitask = (_folder(tmp_path, s, settings, shards)
                           for s in ("standard", "multitask"))
    only_deep = _folder(tmp_path, "deep", settings, [p for p in shards if "/ioi-" in p])
    both = C.combine([multitask, standard, only_deep], n_draws=50)
    lines = C.same_task_lines(both)
    rows = [ln for ln in lines if ln.startswith("| agreement") or ln.startswith("| ioi")]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| agreement", "multitask"], ["| agreement", "standard"],
        ["| ioi", "multitask"], ["| ioi", "standard"], ["| ioi", "deep"]]
    points = [re.sub(r" \[[^]]*\]", "", r).split(" | ")[2:] for r in rows]
    for a, b in ((0, 1), (2, 3), (3, 4)):  # the same runs: the same values (each task's
        assert points[a] == points[b]      # bootstrap draws its own, so not its intervals)
    share = both["tasks"]["standard/agreement"]["v4"]["answer_column_share"]
    assert f"| {share:.3f} |" in rows[1]
    assert lines[-2].endswith("S1-lin: none. AtP: none.")
    # two different tasks' rows standing in for one task: agreement's and ioi's S1-lin
    # intervals do not overlap, and the line names them with both values
    apart = {"x": {"standard": both["tasks"]["standard/agreement"],
                   "multitask": both["tasks"]["multitask/ioi"]}}
    a, b = (apart["x"][s]["v4"]["rows"]["S1-lin"] for s in ("standard", "multitask"))
    assert C._apart(a, b) == (a["ci95"][1] < b["ci95"][0] or b["ci95"][1] < a["ci95"][0])
    text = C.apart_lines(apart)[0]
    assert (f"x (standard {a['R_pair']:.3f}, multitask {b['R_pair']:.3f})" in text) \
        == C._apart(a, b)
    assert C.same_task_lines(C.combine([standard, only_deep], n_draws=50))[0] \
        == "## The same task on several scales"


def test_a_subset_or_partial_folder_is_named_as_such(tmp_path, committed):
    """A folder of some of its scale's tasks or seeds (results.json "scope"), or with runs
    missing, makes the combination say so per scale; a whole scale's folder adds no line."""
    settings, shards = committed
    standard, deep = (_folder(tmp_path, s, settings, shards) for s in ("standard", "deep"))
    record = json.load(open(os.path.join(deep, "results.json")))
    record.update(scope={"tasks": list(TASKS), "train_seeds": [0], "scale_tasks": [
        "agreement", "ioi", "pointer"], "scale_train_seeds": [0, 1, 2]},
        partial=True, runs_done=6, runs_total=9)
    (tmp_path / "deep" / "results.json").write_text(json.dumps(record))
    whole = dict(record["scope"], tasks=record["scope"]["scale_tasks"], train_seeds=[0, 1, 2])
    (tmp_path / "standard" / "results.json").write_text(json.dumps(
        {"settings": dict(settings, scale="standard"), "scope": whole}))
    both = C.combine([standard, deep], n_draws=50)
    assert list(both["subsets"]) == ["deep"] and both["partial_scales"] == {"deep": [6, 9]}
    text = C.markdown(both)
    assert ("**Scope: the deep folder holds a subset of its scale's run**: tasks agreement, "
            "ioi of agreement, ioi, pointer; training seeds 0 of 0, 1, 2.") in text
    assert "**Partial: the deep folder has 6 of its 9 runs**" in text
    assert "the standard folder" not in text


def test_combine_user_errors(tmp_path, committed, capsys):
    from steerops.app.cli import main
    settings, shards = committed
    one = _folder(tmp_path, "standard", settings, shards)
    partial = tmp_path / "partial"  # a results.json whose settings lack the run's keys
    partial.mkdir()
    (partial / "results.json").write_text(json.dumps({"settings": {"scale": "deep"}}))
    for argv, needle in (([one], "at least two folders"),
                         ([one, one], "a second standard-scale folder"),
                         ([one, str(tmp_path)], "no readable results.json"),
                         ([one, str(partial)], "no readable results.json")):
        try:
            code = main(["bench", "combine", *argv, "--out", str(tmp_path / "o")])
        except SystemExit as e:  # argparse's own errors exit; the command's return 2
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
