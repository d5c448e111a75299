"""The attribution benchmark's plots (docs/protocol.md v3): the faithfulness-compute
plane per family, Cap(k) curves as small multiples (every method in a panel of its
own), compute against |S*| and eval pairs, and per task heatmaps of g and of every
method's scores, each panel with its own colour scale, colourbar and axis ticks."""
import os

import numpy as np

from .aggregate import ABOUT, CAP_FRACTIONS, PAPER_COMPUTE, PAPER_R
from .methods import METHODS
from .plots_v4 import plot_break_even, plot_plane_v4, plot_shares

HEATMAP_METHODS = ("S1-proj", "S1-proj-abs", "S1-lin", "S1-exact", "S1-exact-odd", "S1-class",
                   "S2", "AtP", "norm", "S1-proj-randvec", "S1-proj-abs-randvec",
                   "S1-exact-randvec")
FORM_LABELS = {"floor": "patching at its floor", "naive_batched": "naive-batched patching"}
MARKERS = dict(zip(METHODS, "osD^vPXhp<>*d"))


def _colours():
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab20")
    return {m: cmap(i % 20) for i, m in enumerate(METHODS)}


def plot_plane(results, path):
    """R with its interval against compute (counted) over each form of patching (one row
    per form), per family; hollow markers of distinct shapes so that coinciding methods
    stay visible."""
    import matplotlib.pyplot as plt
    fams = list(results["families"])
    colours = _colours()
    fig, axes = plt.subplots(2, len(fams), figsize=(5.0 * len(fams), 8.4), squeeze=False)
    for row, form in enumerate(("floor", "naive_batched")):
        for ax, fam in zip(axes[row], fams):
            _plane_panel(ax, results["families"][fam]["methods"], form, colours,
                         f"{fam} tasks, against {FORM_LABELS[form]}")
    _legend_right(fig, axes, path)


def _plane_panel(ax, ms, form, colours, title):
    for m in METHODS:
        e = ms[m]
        x = (e.get("compute") or {}).get(f"ratio_{form}")
        if m == "random" or not x or not np.isfinite(x):
            ax.axhline(e["value"], color=colours[m], ls=":", lw=1, label=f"{m} (no compute)")
            continue
        lo, hi = e["ci95"] if e["ci95"][0] is not None else (e["value"],) * 2
        ax.errorbar([x], [e["value"]], yerr=[[max(0.0, e["value"] - lo)],
                                             [max(0.0, hi - e["value"])]],
                    fmt=MARKERS[m], mfc="none", ms=8, mew=1.5, color=colours[m],
                    capsize=3, label=m)
    ax.scatter([1.0], [1.0], marker="*", s=140, color="k", label="patching (that form)",
               zorder=4)
    ax.axhline(PAPER_R, color="gray", ls="--", lw=0.8, label=f"paper: R {PAPER_R}")
    ax.axvline(PAPER_COMPUTE * ABOUT, color="gray", ls="-.", lw=0.8,
               label="paper: about 4% (<= 0.05)")
    ax.set(xscale="log", xlabel="compute / patching (FLOPs, fit counted)",
           ylabel="R (mean Cap(k), k = 1..|S*|/2)", title=title,
           ylim=(min(-0.05, ax.get_ylim()[0]), 1.08))


def _legend_right(fig, axes, path, below=False):
    """One legend for every panel, outside them (to the right, or below), then save."""
    import matplotlib.pyplot as plt
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if below:
        fig.legend(handles, labels, loc="lower center", fontsize=8, ncol=2)
        fig.tight_layout(rect=(0, 0.2, 1, 1))
    else:
        legend = fig.legend(handles, labels, loc="center right", fontsize=8)
        # the panels end where the legend begins: its width is measured, since a fixed
        # fraction of a two-family figure is narrower than the longest label
        fig.canvas.draw()
        width = legend.get_window_extent().width / fig.bbox.width
        fig.tight_layout(rect=(0, 0, 1 - width - 0.03, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cap(results, path):
    """Cap(k) against k / |S*| (mean over the headline tasks, band ±1.96 s.e.), one
    panel per method, random and patching drawn in every panel for reference."""
    import matplotlib.pyplot as plt
    fam = results["families"]["all"]["methods"]
    shown = [m for m in METHODS if m != "random"]
    cols = 4
    rows = int(np.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), sharex=True,
                             sharey=True, squeeze=False)
    x = 100 * CAP_FRACTIONS
    rand = np.asarray(fam["random"]["cap"], float)
    for ax, m in zip(axes.flat, shown):
        cap, se = np.asarray(fam[m]["cap"], float), np.asarray(fam[m]["cap_se"], float)
        ax.plot(x, cap, marker="o", ms=3, color="C0", label="method")
        ax.fill_between(x, cap - 1.96 * se, cap + 1.96 * se, color="C0", alpha=0.15)
        ax.plot(x, rand, ls="--", color="gray", lw=1, label="random")
        ax.axhline(1.0, color="k", lw=0.6, label="patching")
        ax.set_title(f"{m}: R {fam[m]['value']:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("k (% of |S*|)")
    for ax in axes[:, 0]:
        ax.set_ylabel("Cap(k)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Cap(k), mean over {len(results['families']['all']['tasks'])} tasks "
                 "(band: ±1.96 s.e. over tasks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _same_cost_groups(curves):
    """Methods whose curves coincide (same stages) drawn once, labelled together."""
    groups = {}
    for m, ys in curves.items():
        if m != "random":
            groups.setdefault(tuple(np.round(ys, 12)), []).append(m)
    return list(groups.values())


def plot_compute(results, path):
    """Analytic compute ratio (counted, over the floor) against |S*| and eval pairs;
    methods of the same cost share one line; realistic sizes as points."""
    import matplotlib.pyplot as plt
    curves = results["curves"]
    colours = _colours()
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    for group in _same_cost_groups(curves["by_sites"]):
        m = group[0]
        style = dict(marker=MARKERS[m], ms=4, mfc="none", color=colours[m])
        axes[0].plot(curves["sites"], curves["by_sites"][m], label=", ".join(group), **style)
        axes[1].plot(curves["pairs"], curves["by_pairs"][m], **style)
    for name, r in (results.get("realistic") or {}).items():
        if isinstance(r, dict) and "methods" in r:
            y = r["methods"]["S1-proj"]["ratio"]["floor"]
            axes[0].scatter([r["star_sites"]], [y], marker="x", s=60, color="k", zorder=4)
            axes[0].annotate(f"{name}, S1-proj", (r["star_sites"], y), fontsize=7,
                             xytext=(4, 4), textcoords="offset points")
    for ax in axes:
        ax.axhline(PAPER_COMPUTE, color="gray", ls="-.", lw=0.8)
        ax.set(xscale="log", yscale="log", ylabel="compute / patching floor (fit counted)")
        ax.grid(alpha=0.3)
    axes[0].set(xlabel="|S*| (scored sites; the task model's shape, longer prompts)",
                title="against |S*|")
    axes[1].set(xlabel="eval pairs", title="against eval pairs (the benchmark's prompts)")
    _legend_right(fig, axes[None, :], path, below=True)


def _heat(ax, m, shown):
    """``m`` (layer x position) on a colour scale symmetric about 0, its own; sites
    outside ``shown`` grey. Returns the image, for its colourbar."""
    vals = np.where(shown, m, np.nan)
    vmax = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    vmax = vmax or 1.0
    im = ax.imshow(np.ma.masked_invalid(vals), aspect="auto", cmap="RdBu_r", vmin=-vmax,
                   vmax=vmax, origin="lower", interpolation="nearest")
    ax.imshow(np.ma.masked_where(shown, np.ones_like(m)), aspect="auto", cmap="Greys",
              vmin=0, vmax=4, origin="lower", interpolation="nearest")
    return im


def plot_task_heatmaps(run, path):
    """One task's first run: g and every method's mean scores over layer x position,
    each panel its own colour scale and labelled colourbar; sites outside S* grey."""
    import matplotlib.pyplot as plt
    keys = ("effects",) + HEATMAP_METHODS
    star = np.asarray(run["star"], bool)
    L1, T = star.shape
    cols = 4
    rows = int(np.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.5 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        m = np.asarray(run["effects"] if key == "effects" else run["scores"][key], float)
        im = _heat(ax, m, star)
        ax.set_title("patching g" if key == "effects" else key, fontsize=9)
        ax.set_yticks(range(L1))
        step = max(1, T // 8)
        ax.set_xticks(range(0, T, step))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("position", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=6)
        cb.set_label("g" if key == "effects" else "score", fontsize=7)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{run['task']} (training seed {run.get('train_seed', 0)}, split "
                 f"{run['split_seed']}): colour scale per panel; grey = outside S*",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PAIR_PANELS = ("effects", "S1-lin", "S1-exact", "AtP", "S1-proj")  # g, then the readings


def plot_pair_heatmap(run, path):
    """One eval pair (the run's first) over layer x its own prompt's tokens: its own g and
    the readings' scores, each panel its own colour scale; sites outside this pair's S*
    grey; p* labelled clean→corrupt. A mean map mixes pairs whose layouts differ (every
    multi-hop prompt has its own), so where a chain's value travels shows per pair."""
    import matplotlib.pyplot as plt

    from .vocabulary import token_text
    pp = run["v4"]["per_pair"]
    star = np.asarray(run["star"], bool)
    L1, T = star.shape
    k = int(star.sum())
    own = np.zeros_like(star)
    own[star] = np.asarray(pp["pair_star"][:k], bool)  # pair 0's own S*, within S*
    clean, corrupt = pp["example"]["clean"], pp["example"]["corrupt"]
    labels = [token_text(c) if c == x else f"{token_text(c)}→{token_text(x)}"
              for c, x in zip(clean, corrupt)]
    keys = [key for key in PAIR_PANELS if key == "effects" or key in pp["scores"]]
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(8.0, 0.24 * T + 2), 2.3 * len(keys)),
                             squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        m = np.full((L1, T), np.nan)
        m[star] = np.asarray(pp["g"] if key == "effects" else pp["scores"][key], float)[:k]
        im = _heat(ax, m, own)
        ax.set_title("patching g (this pair)" if key == "effects" else key, fontsize=9)
        ax.set_yticks(range(L1))
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        for tick, c, x in zip(ax.get_xticklabels(), clean, corrupt):
            if c != x:
                tick.set_color("tab:red")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("layer", fontsize=7)
        cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        cb.ax.tick_params(labelsize=6)
    fig.suptitle(f"{run['task']}, one eval pair (training seed {run.get('train_seed', 0)}, "
                 f"split {run['split_seed']}): its clean tokens, p* in red as clean→corrupt; "
                 f"colour scale per panel; grey = outside this pair's S*", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plots(results, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    plot_plane_v4(results, os.path.join(out_dir, "plane.png"))
    plot_shares(results, os.path.join(out_dir, "answer_column_share.png"))
    plot_break_even(results, os.path.join(out_dir, "break_even.png"))
    plot_plane(results, os.path.join(out_dir, "plane_v3.png"))
    plot_cap(results, os.path.join(out_dir, "cap_curves.png"))
    plot_compute(results, os.path.join(out_dir, "compute_ratio.png"))
    folder = os.path.join(out_dir, "heatmaps")
    os.makedirs(folder, exist_ok=True)
    first = {}
    for r in results["runs"]:
        first.setdefault(r["task"], r)
    for task, run in first.items():
        plot_task_heatmaps(run, os.path.join(folder, f"{task}.png"))
        if "example" in run.get("v4", {}).get("per_pair", {}):  # runs from before 2026-12-04
            plot_pair_heatmap(run, os.path.join(folder, f"{task}-pair.png"))  # lack it
