"""`steerops bench combine` (bench/combine.py): the v4 verdict per scale and together from
several benchmark folders' shards, tasks named scale/task, one family per scale."""
import glob
import json
import os
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
