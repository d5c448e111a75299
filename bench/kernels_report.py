"""The kernel benchmark's tables and plot (bench/kernels.py measures; this writes)."""
import os


def predict_markdown(result):
    lines = [f"Predicted from bytes alone at {result['copy_GBps']:.0f} GB/s ({result['basis']}), "
             f"floored at {result['launch_floor_us']:g} us per kernel launch; resources from "
             f"the sm_90a compile report. No time here was measured.", "",
             "| pass | dtype | N | D | K | MB moved | predicted us | BLOCK_D | single pass | warps "
             "| regs | programs/SM |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for k, lc in r["launch"].items():
            label = r["pass_"] if r["pass_"] == k else f"{r['pass_']} ({k})"
            lines.append(f"| {label} | {r['dtype']} | {r['N']} | {r['D']} | {r['K']} | "
                         f"{r['bytes'] / 1e6:.1f} | {r['predicted_us']:.1f} | {lc['BLOCK_D']} | "
                         f"{lc['single_pass']} | {lc['num_warps']} | {lc.get('registers', '')} | "
                         f"{lc.get('programs_per_sm', '')} |")
    return "\n".join(lines)


def markdown(result):
    lines = [f"Device {result['device']} (CUDA {result['driver']}), torch {result['torch']}, "
             f"triton {result['triton']}, commit {result['commit']}; copy bandwidth "
             f"{result['copy_GBps']:.0f} GB/s (read + write)."
             + ("" if result.get("complete", True) else
                " PARTIAL: the run stopped before its grid ended."), "",
             "| op | mode | pass | dtype | N | D | K/M | provider | us | predicted us | GB/s "
             "| % copy |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            continue
        lines.append(f"| {r['op']} | {r['mode']} | {r['pass_']} | {r['dtype']} | {r['N']} | "
                     f"{r['D']} | {r.get('K', r.get('M'))} | {r['provider']} | "
                     f"{1e3 * r['ms']:.1f} | {r['predicted_us']:.1f} | {r['GBps']:.0f} | "
                     f"{r['pct_copy']:.0f} |")
    return "\n".join(lines)


PLOT_PROVIDERS = {
    "steerops": "steerops.steer (validated: one host sync)",
    "steerops_unchecked": "steerops.steer under unchecked()",
    "steerops_launch": "steerops kernel launch alone",
    "steerops_pipelined": "steerops backward, row loop pipelined (unchecked)",
    "eager": "eager PyTorch",
    "compile": "torch.compile",
}


def plot(result, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "error" not in r and r["op"] == "steer"
            and r["pass_"] == "fwd" and r["dtype"] == "bf16" and r["N"] == max(
                x["N"] for x in result["rows"] if x["op"] == "steer")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for prov, label in PLOT_PROVIDERS.items():
        pts = sorted((r["D"], r["GBps"]) for r in rows if r["provider"] == prov
                     and r["mode"] == rows[0]["mode"] and r.get("K", 1) == rows[0].get("K", 1))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(result["copy_GBps"], color="gray", ls="--", label="copy")
    ax.set(xlabel="D", ylabel="GB/s (bytes read + written)",
           title=f"steer fwd {rows[0]['mode']} bf16, N={rows[0]['N']}, K={rows[0].get('K', 1)}"
                 f" ({result['device']})")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kernels_steer_fwd.png"), dpi=120)
    plt.close(fig)
