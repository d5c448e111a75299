"""The v4 verdict per scale and together (docs/protocol.md: "The headline uses standard,
deep and multitask, each reported apart and together"): the finished runs of several
benchmark folders, one scale each, pooled. A task is named ``scale/task`` (ioi on the
standard models and ioi on the shared multitask model are different task models), the
families are kept across scales, and each scale is a family of its own, so one
bootstrap gives the verdict together and per scale with the same rule.

    steerops bench combine bench/results/attribution_v4 bench/results/attribution_deep \\
        --out bench/results/attribution_together
"""
import json
import os
from itertools import combinations

from steerops.app.cli_args import (Parser, UsageError, existing_folder, output_folder,
                                   positive_int)

from .aggregate import summarize
from .attribution import SEED
from .controls import TWINS
from .provenance import read_shard, save_results
from .reporting import is_subset, subset_text
from .report_v4 import _ci, _diff, _f, v4_lines
from .run_store import compact, shard_path
from .tasks import FAMILIES

SCALE_FAMILY = "scale {}"  # the family that holds one scale's tasks


def read_scale(folder):
    """(scale, settings, runs, excluded models, record) of one benchmark folder: its
    results.json names the settings, the models the 95% rule left out and the run's
    scope, and the runs are its shards for those settings (none when every model was
    left out)."""
    try:
        with open(os.path.join(folder, "results.json")) as f:
            record = json.load(f)
        settings = record["settings"]
        runs_dir = os.path.dirname(shard_path(folder, settings, "x", 0, 0))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{folder}: no readable results.json with the run's settings ({e}); "
                         f"give folders that steerops bench attribution wrote") from None
    excluded = record.get("excluded_models", [])
    names = sorted(n for n in os.listdir(runs_dir) if n.endswith(".json.gz")) \
        if os.path.isdir(runs_dir) else []
    if not names and not (excluded and record.get("runs_done") == 0):
        raise UsageError(f"{folder}: no finished runs under {runs_dir}")
    return (settings["scale"], settings, [read_shard(os.path.join(runs_dir, n)) for n in names],
            excluded, record)


def combine(folders, n_draws=None, seed=SEED):
    """Results over the runs of ``folders`` (one scale each): tasks named scale/task,
    families over every scale plus one family per scale."""
    runs, scales, draws, excluded, subsets, partial = [], [], [], {}, {}, {}
    for folder in folders:
        scale, settings, scale_runs, excluded[scale], record = read_scale(folder)
        if is_subset(record.get("scope")):
            subsets[scale] = record["scope"]
        if record.get("partial"):
            partial[scale] = [record["runs_done"], record["runs_total"]]
        if scale in scales:
            raise UsageError(f"{folder}: a second {scale}-scale folder; give one per scale")
        scales.append(scale)
        draws.append(settings["n_boot_hier"])
        runs += [dict(r, task=f"{scale}/{r['task']}", scale=scale) for r in scale_runs]
    measured = [s for s in scales if any(r["scale"] == s for r in runs)]
    if not measured:
        raise UsageError("no finished runs in any folder: every task model of every scale "
                         "was excluded")
    families = {fam: [f"{s}/{t}" for s in measured for t in members]
                for fam, members in FAMILIES.items()}
    families.update({SCALE_FAMILY.format(s): sorted({r["task"] for r in runs
                                                     if r["scale"] == s}) for s in measured})
    n_draws = n_draws or min(draws)
    results = {"scales": scales, "folders": list(folders), "runs_done": len(runs),
               "runs_per_scale": {s: sum(r["scale"] == s for r in runs) for s in scales},
               "scales_without_verdict": [s for s in scales if s not in measured],
               "excluded_models": {s: e for s, e in excluded.items() if e},
               # a folder of some of its scale's tasks or seeds, or one with runs still
               # missing: the combination is over what they hold and says so
               "subsets": subsets, "partial_scales": partial,
               "settings": {"n_boot_hier": n_draws, "seed": seed, "scale": " + ".join(scales)}}
    results.update(summarize(runs, n_draws, seed, families))
    return results


def markdown(results):
    lines = [f"# Attribution benchmark, protocol v4: {' + '.join(results['scales'])} together",
             "", f"{results['runs_done']} runs ("
             + ", ".join(f"{s}: {n}" for s, n in results["runs_per_scale"].items())
             + "). Tasks are named scale/task; the family `scale S` is scale S alone, "
               "`all` is every scale together; one bootstrap for all of them.", ""]
    for s, scope in results.get("subsets", {}).items():
        lines += [f"**Scope: the {s} folder holds a subset of its scale's run**: "
                  f"{subset_text(scope)}. Its numbers, alone and in every family it adds "
                  f"to, are that subset's, not the scale's verdict.", ""]
    for s, (done, total) in results.get("partial_scales", {}).items():
        lines += [f"**Partial: the {s} folder has {done} of its {total} runs**; the "
                  f"combination is over those.", ""]
    for s in results.get("scales_without_verdict", []):
        lines += [f"**No verdict at the {s} scale: every task model is below 95% held-out "
                  f"accuracy**, so it adds no run here (listed below).", ""]
    for s, models in results.get("excluded_models", {}).items():
        lines += [f"Excluded at {s}: " + ", ".join(
            f"{e['task']} seed {e['train_seed']} ({e['held_out_accuracy']:.3f})"
            for e in models) + " (held-out accuracy < 0.95).", ""]
    return "\n".join(lines + v4_lines(results) + same_task_lines(results))


SAME_TASK_READINGS = ("S1-lin", "AtP")  # a steering reading beside the gradient baseline


def same_task_lines(results):
    """One task trained on its own model and again on the shared multitask model (or on
    two scales at all): the evidence for what changes between them, side by side. The
    two are different models, bootstrapped apart, so each row carries its own interval;
    a difference is only read where the intervals do not overlap."""
    by_task = {}
    for name, t in results["tasks"].items():
        scale, task = name.split("/", 1)
        by_task.setdefault(task, {})[scale] = t
    shared = {task: {s: scales[s] for s in results["scales"] if s in scales}
              for task, scales in by_task.items() if len(scales) > 1}  # in the command's order
    if not shared:
        return []
    head = [f"{m} [95% CI]" + (f" | {m} − twin" if m in TWINS else "")
            for m in SAME_TASK_READINGS]
    lines = ["## The same task on several scales", "",
             "Each task below was trained on a model of its own on one scale and again on "
             "another (on `multitask`: one shared model for all 15 tasks). Rows are separate "
             "models with separate intervals. Answer-column share: the share of Σ|g| over S* "
             "in the answer column.", "",
             "| task | scale | runs | \\|S*\\| | answer-column share | prior-answer | "
             + " | ".join(head) + " |",
             "|---|---|---|---|---|---|" + "---|" * sum(1 + (m in TWINS)
                                                         for m in SAME_TASK_READINGS)]
    for task, scales in sorted(shared.items()):
        for scale, t in scales.items():
            r = t["v4"]["rows"]
            cells = [f"{_f(r[m]['R_pair'])}{_ci(r[m])}" + (
                f" | {_diff(r[m].get('vs_twin'))}" if m in TWINS else "")
                for m in SAME_TASK_READINGS]
            lines.append(f"| {task} | {scale} | {t['runs']} | {t['informative_sites']:.0f} "
                         f"| {_f(t['v4']['answer_column_share'])} "
                         f"| {_f(r['prior-answer']['R_pair'])} | " + " | ".join(cells) + " |")
    return lines + [""] + apart_lines(shared)


def _apart(a, b):
    """Whether two rows' 95% intervals do not overlap."""
    (lo_a, hi_a), (lo_b, hi_b) = a.get("ci95") or (None, None), b.get("ci95") or (None, None)
    return None not in (lo_a, lo_b) and (hi_a < lo_b or hi_b < lo_a)


def apart_lines(shared):
    """Per reading, the tasks whose intervals on two scales do not overlap, with both
    values: the differences between the scales that the intervals alone support."""
    out = []
    for m in SAME_TASK_READINGS:
        found = []
        for task, scales in sorted(shared.items()):
            for s, u in combinations(scales, 2):  # every pair of scales, in the given order
                a, b = scales[s]["v4"]["rows"][m], scales[u]["v4"]["rows"][m]
                if _apart(a, b):
                    found.append(f"{task} ({s} {_f(a['R_pair'])}, {u} {_f(b['R_pair'])})")
        out.append(f"{m}: " + (", ".join(found) or "none") + ".")
    return ["Intervals apart between scales (the same task, non-overlapping 95% intervals): "
            + " ".join(out), ""]


def main(argv=None):
    p = Parser(prog="steerops bench combine",
               description="The v4 verdict per scale and together, from the finished runs of "
                           "several `steerops bench attribution` folders (one per scale).")
    p.add_argument("folders", nargs="+", type=existing_folder, metavar="FOLDER",
                   help="benchmark output folders (results.json and runs/), one per scale")
    p.add_argument("--out", required=True, type=output_folder,
                   help="where results.json and results.md of the combination go")
    p.add_argument("--draws", type=positive_int, default=None,
                   help="bootstrap draws (default: the smallest of the folders' settings)")
    args = p.parse_args(argv)
    if len(args.folders) < 2:
        p.error("give at least two folders (one per scale) to combine")
    results = combine(args.folders, args.draws)
    table = markdown(results)
    save_results(args.out, "results", compact(results), table)
    from .plots_v4 import plot_plane_v4, plot_shares
    plot_plane_v4(results, os.path.join(args.out, "plane.png"))
    plot_shares(results, os.path.join(args.out, "answer_column_share.png"))
    print(table)
    print(f"\nwrote {args.out}/results.json, results.md, plane.png (per scale and together), "
          f"answer_column_share.png (per task and scale)")
    return 0


if __name__ == "__main__":
    main()
