"""The attribution benchmark's Markdown report and plots (docs/protocol.md v2 output):
the faithfulness-compute plane first, then Cap(k) curves, compute vs |S| and
patching-vs-method heatmaps for every task."""
import json
import os

import numpy as np

from . import faithfulness as F
from .methods import METHODS

PAPER_R, PAPER_COMPUTE = 0.88, 0.04
SHOWN = ("S1-proj", "S1-lin", "S1-exact", "S1-class", "S2", "AtP", "norm", "random",
         "S1-proj-randvec", "S1-exact-randvec")


def _f(x, digits=3):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _ci(ci):
    if not ci or ci[0] is None or not np.isfinite(ci[0]):
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _seeds(s):
    if not s:
        return "n/a"
    return (f"{s['mean']:.3f} ± {s['sd']:.3f} (range {s['min']:.3f}–{s['max']:.3f}, "
            f"{s['combinations']} seed combinations)")


def markdown(results):
    h = results["headline"]
    env = results["environment"]
    st = results["settings"]
    fam = results["families"]
    lines = [
        f"# Attribution benchmark, protocol v{results['protocol']['version']} "
        f"({results['protocol']['document']}), scale `{st['scale']}`",
        "",
    ]
    if results.get("partial"):
        miss = results["missing_runs"]
        lines += [f"**Partial: {results['runs_done']} of {results['runs_total']} runs** (missing: "
                  f"{len(miss)} runs of {len({(t, s) for t, s, _ in miss})} task models; rerun the "
                  "same command to complete them, finished runs are kept).", ""]
    for e in results.get("excluded_models", []):
        lines += [f"Excluded: {e['task']} training seed {e['train_seed']} (held-out accuracy "
                  f"{e['held_out_accuracy']:.3f} < 0.95; its "
                  f"{len(results['split_seeds'])} runs are left out, not missing).", ""]
    lines += [
        f"**Faithfulness ratio = {_f(h['faithfulness_ratio'])}**"
        f"{_ci(h['faithfulness_ratio_ci95'])} (95% bootstrap interval): mean over "
        f"{fam['all']['methods']['S1-proj']['tasks']} tasks of R for S1-proj, where R = mean "
        "over k in {1, 2, 5, 10, 20, 50}% of |S*| of Cap(k), sites ranked by |a|, S* = the "
        "informative sites (not identical in clean and corrupt, not the two endpoint sites); "
        "patching scores 1, the paper claims 0.88. Over training x split seeds: "
        f"{_seeds(h['faithfulness_ratio_seeds'])}. By family: "
        + ", ".join(f"{k} {_f(v)}" for k, v in h["faithfulness_ratio_by_family"].items())
        + f". Version 1's number (signed ranking, all sites) on the same runs: "
        f"{_f(h['faithfulness_ratio_v1'])}.",
        "",
        f"**Compute ratio = {_f(h['compute_ratio_flops'], 4)}** (analytic FLOPs, both sides in "
        "their cheapest correct form) / "
        f"{_f(h['compute_ratio_counted_flops'], 4)} (FlopCounterMode, forms as run) / "
        f"{_f(h['compute_ratio_time'], 4)} (median time, {env['device']}, "
        f"{env.get('torch_threads')} thread(s)): S1-proj (D_fit + D_eval caches) over patching "
        "(clean + corrupt runs, then per site only what differs: KV prefix reused, blocks "
        "before the site skipped, LM head at the answer); mean over runs. The paper claims "
        "about 0.04. Against each form of patching (analytic FLOPs): "
        + ", ".join(f"{k.replace('_', '-')} {_f(v, 4)}"
                    for k, v in h.get("compute_ratio_vs_patching_forms", {}).items()) + ".",
        "",
    ]
    for name, f in fam.items():
        lines += [f"## Methods, {name} tasks ({len(f['tasks'])})", "",
                  "| method | R (abs) [95% CI] | seeds mean ± sd | R signed | R' | R'' (vs norm) "
                  "| Spearman | top-10% recall | v1 R | compute (floor FLOPs) | counted FLOPs "
                  "| time |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in SHOWN:
            e = f["methods"][m]
            s = e["seeds"]
            c = e["compute"]
            lines.append(
                f"| {m} | {_f(e['value'])}{_ci(e['ci95'])} | "
                f"{_f(s['mean']) + ' ± ' + _f(s['sd']) if s else 'n/a'} | {_f(e['R_signed'])} | "
                f"{_f(e['R_prime'])} | {_f(e['R_skill'])} | {_f(e['spearman'])} | "
                f"{_f(e['top10_recall'], 2)} | {_f(e['v1_R'])} | {_f(c['floor_flops'], 4)} | "
                f"{_f(c['counted_flops'], 4)} | {_f(c['seconds'], 4)} |")
        lines.append("")
    lines += ["## Per task (mean over seeds; interval from the seed-averaged bootstrap)", "",
              "| task | family | runs | sites / S* | S1-proj R [95% CI] | sd over seeds | "
              "S1-lin | S1-exact | S1-class | S2 | AtP | norm | random | recovery top-1 / "
              "top-5% (steer / patch) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"
              "---|---|"]
    for name, t in results["tasks"].items():
        m = t["methods"]
        rec = t["recovery"]
        lines.append(
            f"| {name} | {t['family']} | {t['runs']} | {t['sites']} / "
            f"{t['informative_sites']:.0f} | {_f(m['S1-proj']['R'])}{_ci(m['S1-proj']['R_ci95'])}"
            f" | {_f(m['S1-proj']['R_sd'])} | "
            + " | ".join(_f(m[k]["R"]) for k in ("S1-lin", "S1-exact", "S1-class", "S2", "AtP",
                                                 "norm", "random"))
            + f" | {_recovery(rec['top1'])} / {_recovery(rec['top5pct'])} |")
    agree = results.get("stage_agreement", {})
    if agree:
        lines += ["", "FlopCounterMode vs analytic FLOPs, worst relative gap per stage: "
                  + ", ".join(f"{k} {v['max_relative_gap']:.2f}"
                              + ("" if v["within_25pct"] else " (over 25%)")
                              for k, v in agree.items()) + "."]
    real = results.get("realistic")
    if real:
        lines += ["", "Realistic-size configs (random init, |S| = (L+1) x 10 positions, same "
                  "pairs): FLOPs ratio S1-proj / patching floor " + ", ".join(
                      f"{k}: {v['flops_ratio_S1']:.4f} (|S| = {v['sites']})"
                      for k, v in real.items()) + "."]
        for name, r in real.items():
            meas = r["measured"]
            if meas is None:
                lines.append(f"Time on {name}: not measured in this run.")
                continue
            lines.append(f"Measured time on {name} ({meas['device']}, {meas['pairs']} pairs, "
                         f"median of {meas.get('repeats', 1)}): steering "
                         f"{meas['steering_seconds']:.2f} s vs patching "
                         f"{meas['patching_seconds']:.2f} s, ratio {meas['time_ratio_S1']:.4f}.")
    lines += ["", f"Run on {env['device']} ({env.get('torch_threads')} torch threads); torch "
              f"{env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
              f"commit {env['commit']}; {results['runs_done']} runs "
              f"({results.get('runs_resumed', 0)} resumed from shards) in "
              f"{results.get('total_seconds', 'n/a')} s; settings {json.dumps(st)}."]
    return "\n".join(lines)


def _recovery(entry):
    if entry["ratio"] is None:
        return f"undefined (sum g {_f(entry['sum_g'], 2)})"
    return f"{entry['ratio']:.2f}{_ci(entry['ci95']) if entry['ci95'][0] is not None else ''}"


# ----------------------------------------------------------------------------- plots

def _colours():
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(METHODS)}


def plot_plane(results, path):
    """Every method: R (|a|, S*) with its interval vs compute ratio (log), per family."""
    import matplotlib.pyplot as plt
    fams = list(results["families"])
    colours = _colours()
    # hollow markers of distinct shapes: methods that coincide (S1-class is S1-proj where
    # a task has one class) stay visible on top of each other
    markers = dict(zip(METHODS, "osD^vPXhp<>"))
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        ms = results["families"][fam]["methods"]
        for m in METHODS:
            e = ms[m]
            x = e["compute"]["floor_flops"]
            if m == "random" or not x or not np.isfinite(x):
                ax.axhline(e["value"], color=colours[m], ls=":", lw=1,
                           label=f"{m} (no compute)")
                continue
            lo, hi = e["ci95"] if e["ci95"] and e["ci95"][0] is not None else (e["value"],) * 2
            # a bootstrap percentile interval need not contain the point estimate
            ax.errorbar([x], [e["value"]], yerr=[[max(0.0, e["value"] - lo)],
                                                 [max(0.0, hi - e["value"])]],
                        fmt=markers[m], mfc="none", ms=8, mew=1.5, color=colours[m],
                        capsize=3, label=m)
        ax.scatter([1.0], [1.0], marker="*", s=120, color="k", label="patching", zorder=4)
        ax.axhline(PAPER_R, color="gray", ls="--", lw=0.8, label="paper: R 0.88")
        ax.axvline(PAPER_COMPUTE, color="gray", ls="-.", lw=0.8, label="paper: compute 0.04")
        ax.set(xscale="log", xlabel="compute ratio (method / patching, floor FLOPs)",
               ylabel="faithfulness R (|a|, S*)", title=f"{fam} tasks",
               ylim=(min(-0.05, ax.get_ylim()[0]), 1.08))
    _finish_family_figure(fig, axes, path)


def _finish_family_figure(fig, axes, path):
    """One legend for every panel (to the right, hiding no curve), then save."""
    import matplotlib.pyplot as plt
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cap(results, path):
    import matplotlib.pyplot as plt
    ks = [100 * f for f in F.K_FRACTIONS]
    colours = _colours()
    fams = list(results["families"])
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for m in METHODS:
            e = results["families"][fam]["methods"][m]
            cap, se = np.asarray(e["cap"], float), np.asarray(e["cap_se"], float)
            ax.plot(ks, cap, marker="o", ms=3, color=colours[m], label=m)
            ax.fill_between(ks, cap - 1.96 * se, cap + 1.96 * se, color=colours[m], alpha=0.12)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set(xscale="log", xlabel="k (% of S*)", ylabel="Cap(k), mean over tasks",
               title=f"{fam}: band = ±1.96 s.e. over tasks")
    _finish_family_figure(fig, axes, path)


def plot_compute(results, path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    curves = results["curves"]
    axes[0].plot(curves["sites"], curves["ratio_vs_sites"], marker="o", label="analytic S1-proj")
    pts = [(r["sites"], r["compute"]["ratios"]["S1-proj"]["floor_flops"]) for r in results["runs"]]
    axes[0].scatter(*zip(*pts), color="C1", s=12, label="runs (floor FLOPs)", zorder=3)
    for name, r in (results.get("realistic") or {}).items():
        axes[0].scatter([r["sites"]], [r["flops_ratio_S1"]], marker="x", s=60, label=name)
    axes[0].axhline(PAPER_COMPUTE, color="gray", ls="-.", lw=0.8, label="paper: 0.04")
    axes[0].set(xscale="log", yscale="log", xlabel="|S| (sites)",
                ylabel="compute ratio S1-proj / patching", title="compute ratio vs |S|")
    axes[0].legend(fontsize=8)
    axes[1].plot(curves["pairs"], curves["ratio_vs_pairs"], marker="o")
    axes[1].set(xscale="log", yscale="log", xlabel="eval pairs",
                ylabel="compute ratio S1-proj / patching",
                title=f"vs eval pairs (|S| = {curves['max_sites']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmaps(results, path, rows=("effects", "S1-proj", "S1-exact", "AtP")):
    """Every task (its first run): one row per map, one colour scale per row (so the
    tasks of a row compare), sites outside S* greyed."""
    import matplotlib.pyplot as plt
    first = {}
    for r in results["runs"]:
        first.setdefault(r["task"], r)
    tasks = list(first)
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(1.9 * len(tasks) + 1.5,
                                                             2.0 * len(rows)), squeeze=False)
    for i, key in enumerate(rows):
        maps = [np.asarray(first[t]["effects"] if key == "effects" else first[t]["scores"][key],
                           float) for t in tasks]
        stars = [np.asarray(first[t]["star"], bool) for t in tasks]
        vmax = max(float(np.nanmax(np.abs(np.where(s, m, 0)))) for m, s in zip(maps, stars))
        vmax = vmax or 1.0
        for j, (t, m, s) in enumerate(zip(tasks, maps, stars)):
            ax = axes[i, j]
            im = ax.imshow(np.ma.masked_where(~s, m), aspect="auto", cmap="RdBu_r",
                           vmin=-vmax, vmax=vmax, origin="lower")
            ax.imshow(np.ma.masked_where(s, np.ones_like(m)), aspect="auto", cmap="Greys",
                      vmin=0, vmax=4, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(t, fontsize=8)
            if j == 0:
                ax.set_ylabel("patching g" if key == "effects" else key, fontsize=8)
        cb = fig.colorbar(im, ax=list(axes[i]), fraction=0.015, pad=0.01)
        cb.set_label("g (fraction of m restored)" if key == "effects" else f"{key} score",
                     fontsize=7)
    fig.suptitle("layer (up) x position (right); grey: outside S*", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    plot_plane(results, os.path.join(out_dir, "plane.png"))
    plot_cap(results, os.path.join(out_dir, "cap_curves.png"))
    plot_compute(results, os.path.join(out_dir, "compute_ratio.png"))
    plot_heatmaps(results, os.path.join(out_dir, "heatmaps.png"))
