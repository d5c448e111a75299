"""Protocol v4's plots: the plane with R_pair (twins beside their readings, priors as
free lines), the answer-column share per task, and the break-even curves of every
reading's compute ratio over depth and prompt length."""
import numpy as np

from .controls import PRIORS, TWINS
from .headline import BASELINES, COMPUTE_LIMIT, PAPER_R, READINGS, counted

FORM_LABELS = {"floor": "patching at its floor", "naive_batched": "naive-batched patching"}
LEGEND_INCHES = 2.6  # the shared legend's column, right of the panels
PLANE_COLUMNS = 4  # families per row: the together plane has 7+, too narrow on one row
CURVE_METHODS = ("S1-proj", "S1-lin", "S1-exact", "S1-exact-odd", "S2", "AtP", "norm")


MARKERS = dict(zip(("S1-proj", "S1-proj-abs", "S1-lin", "S1-exact", "S1-exact-odd", "S2",
                    "S1-class", "AtP", "norm"), "osD^vPhdp"))


def _colours(names):
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab10")
    palette = [cmap(i) for i in range(10) if i != 7]  # grey is the twins' colour
    return {m: palette[i % len(palette)] for i, m in enumerate(names)}


def plot_plane_v4(results, path):
    """R_pair [interval] against compute (counted) / patching, per family and form; each
    steering reading's random twin at the same compute (grey, joined to it), the priors
    and random as horizontal lines (they cost nothing). Hollow markers of distinct
    shapes: readings that coincide (S1-proj and S1-proj-abs rank each pair alike) stay
    visible."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    fams = results["v4"]["families"]
    colours = _colours(READINGS + BASELINES)
    prior_styles = {"prior-answer": ("k", "--"), "prior-path": ("tab:brown", "-."),
                    "random": ("gray", ":")}
    cols = min(PLANE_COLUMNS, len(fams))
    per_form = -(-len(fams) // cols)  # rows of panels that one form takes
    width = 5.0 * cols + LEGEND_INCHES
    fig, grid = plt.subplots(2 * per_form, cols, figsize=(width, 4.3 * 2 * per_form),
                             squeeze=False)
    for block, form in enumerate(("floor", "naive_batched")):
        panels = list(grid[block * per_form:(block + 1) * per_form].flat)
        for ax in panels[len(fams):]:
            ax.set_visible(False)  # the last row of a form's block may be part-filled
        for ax, (fam, f) in zip(panels, fams.items()):
            rows = f["rows"]
            for m in READINGS + BASELINES:
                x = (rows[m].get("compute") or {}).get(f"ratio_{form}")
                if not x or not np.isfinite(x):
                    continue
                _point(ax, x, rows[m], colours[m], MARKERS.get(m, "o"), m)
                if m in TWINS:
                    t = rows[TWINS[m]]
                    _point(ax, x * 1.08, t, "0.55", "x", "random twin (same compute)")
                    ax.plot([x, x * 1.08], [rows[m]["R_pair"], t["R_pair"]], color="0.7",
                            lw=0.8)
            for name, (c, ls) in prior_styles.items():
                ax.axhline(rows[name]["R_pair"], color=c, ls=ls, lw=1,
                           label=f"{name} (free)" if name in PRIORS else "random (expected)")
            ax.axhline(PAPER_R, color="tab:red", lw=0.6, alpha=0.6, label="R_pair 0.88")
            ax.axvline(COMPUTE_LIMIT, color="tab:red", lw=0.6, ls=(0, (1, 1)),
                       label="compute 0.05")
            ax.set(xscale="log", xlabel=f"compute / {FORM_LABELS[form]} (FLOPs, fit counted)",
                   ylabel="R_pair", title=f"{fam} ({counted(len(f['tasks']), 'task')}), vs {form}",
                   ylim=(min(0.0, ax.get_ylim()[0]), 1.05))
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks collide
    _legend_and_save(fig, grid, path, right=1 - LEGEND_INCHES / width)


def _point(ax, x, e, colour, marker, label):
    lo, hi = e["ci95"] if e["ci95"][0] is not None else (e["R_pair"],) * 2
    ax.errorbar([x], [e["R_pair"]], yerr=[[max(0.0, e["R_pair"] - lo)],
                                          [max(0.0, hi - e["R_pair"])]],
                fmt=marker, mfc="none", ms=9 if marker == "o" else 7, mew=1.4, color=colour, capsize=3, label=label)


def _legend_and_save(fig, axes, path, right=0.82):
    import matplotlib.pyplot as plt
    seen = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    fig.legend(list(seen.values()), list(seen), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shares(results, path):
    """Per task: the answer-column share and the top-3 share of Σ|g| over S*, with
    prior-answer's R_pair; discriminative tasks (prior-answer < 0.8) marked. Tasks named
    scale/task (a combined run) get one row of bars per scale, so that the pooled chart
    of three scales stays as wide as its largest scale."""
    import matplotlib.pyplot as plt
    tasks = results["tasks"]
    groups = {s: [] for s in results.get("scales", [None])}  # in the command's order
    for name in tasks:
        groups[name.split("/")[0] if "scales" in results else None].append(name)
    groups = {s: names for s, names in groups.items() if names}
    widest = max(len(names) for names in groups.values())
    fig, axes = plt.subplots(len(groups), 1, squeeze=False, figsize=(
        max(6.0, 0.75 * widest + 2) + 3.2, 4.4 + 3.4 * (len(groups) - 1)))
    for ax, (scale, names) in zip(axes[:, 0], groups.items()):
        _share_bars(ax, tasks, names, widest)
        title = results["settings"]["scale"] if scale is None else f"{scale} scale"
        ax.set_title(f"How positional is each task's ground truth ({title})")
    axes[0, 0].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _share_bars(ax, tasks, names, slots):
    col = [tasks[n]["v4"]["answer_column_share"] for n in names]
    top3 = [tasks[n]["v4"]["top3_share"] for n in names]
    prior = [tasks[n]["v4"]["rows"]["prior-answer"]["R_pair"] for n in names]
    x = np.arange(len(names))
    ax.bar(x - 0.2, col, 0.4, label="answer-column share of Σ|g| (S*)", color="tab:blue")
    ax.bar(x + 0.2, top3, 0.4, label="top-3 share of Σ|g| (S*)", color="tab:orange")
    ax.plot(x, prior, "kD", mfc="none", label="prior-answer R_pair")
    ax.axhline(0.8, color="k", ls=":", lw=0.8, label="discriminative below 0.8 (prior-answer)")
    labels = [n.split("/")[-1] + ("\n(discr.)" if tasks[n]["v4"]["discriminative"] else "")
              for n in names]  # a combined run's row names its scale in the title
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    # every scale's row has the same slots, so a bar is as wide in each
    ax.set(xlim=(-0.6, slots - 0.4), ylim=(0, 1.05), ylabel="share / R_pair")


def plot_break_even(results, path):
    """Each reading's counted compute ratio against patching at its floor (solid) and
    naive-batched (dashed), over depth L (GPT-2-small width, T = 24) and prompt length
    T (GPT-2-small); the 0.05 line marks "about 4%"."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    curves = results["break_even"]
    colours = _colours(CURVE_METHODS)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, xs, xlabel in ((axes[0], "by_layers", curves["layers"], "layers L (T = 24)"),
                                (axes[1], "by_tokens", curves["tokens"],
                                 "prompt length T (12 layers, p* at T/3)")):
        for m in CURVE_METHODS:
            for form, ls in (("floor", "-"), ("naive_batched", "--")):
                ax.plot(xs, curves[key][m][form], ls, marker="o", ms=3, color=colours[m],
                        label=f"{m} vs {form}")
        ax.axhline(COMPUTE_LIMIT, color="tab:red", lw=0.8, label="0.05")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="compute / patching (FLOPs)",
               title="break-even: " + xlabel.split(" (")[0])
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
    _legend_and_save(fig, np.array(axes), path, right=0.78)
