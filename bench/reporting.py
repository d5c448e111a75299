"""The attribution benchmark's Markdown report (docs/protocol.md v3 output): the
verdict table first, then each family's methods, every task, the models (with
their weight hashes), compute at realistic sizes. Plots: ``bench.plots``."""
import json
from collections import Counter

import numpy as np

from .aggregate import ABOUT, FORMS, PAPER_COMPUTE, PAPER_R
from .report_v4 import v4_lines

SHOWN = ("S1-proj", "S1-proj-abs", "S1-lin", "S1-exact", "S1-exact-odd", "S1-class", "S2",
         "AtP", "norm", "random", "S1-proj-randvec", "S1-proj-abs-randvec", "S1-exact-randvec")
FORM_NAMES = {"floor": "patching at its floor", "naive_batched": "naive-batched patching"}
# what each row of the verdict is: a steering-vector reading (the claim's subject), a
# control (a random direction in place of the learned one) or a baseline without a vector
KIND = {"AtP": "baseline", "norm": "baseline", "S1-proj-randvec": "control",
        "S1-proj-abs-randvec": "control", "S1-exact-randvec": "control"}


def _f(x, digits=3):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _ci(e):
    """' [lo, hi] (bias +b)' and a word where the point lies outside the interval."""
    ci = e.get("ci95")
    if not ci or ci[0] is None:
        return ""
    out = f" [{ci[0]:.3f}, {ci[1]:.3f}] (bias {e['bias']:+.3f})"
    return out + (" **point outside its interval**" if e.get("outside") else "")


def _yes(flag):
    return "**yes**" if flag else "no"


def verdict_lines(results):
    fam = results["families"]["all"]
    rows = results["verdict"]["all"]
    lines = [
        "## Verdict", "",
        f"Over {len(fam['tasks'])} tasks ({', '.join(fam['tasks'])}). R = mean of Cap(k) over "
        "every k = 1..ceil(|S*|/2), sites ranked by |a| on S* (the sites that differ "
        "between clean and corrupt, can reach the metric, and are not restored by "
        "construction); 95% interval from the hierarchical bootstrap (training seeds, "
        "split seeds, eval pairs), with its bias. Compute: the method's FLOPs over "
        "patching's, both priced by the same rules (LM head at the answer only; every "
        "patched or steered forward, the alpha grid included, in the cheapest form); "
        "'counted' includes fitting the vector, 'amortised' leaves it out (fitted once, "
        f"reused). The paper's pair (R >= {PAPER_R} at about {PAPER_COMPUTE:.0%}, read "
        f"as at most {PAPER_COMPUTE * ABOUT:.2f}) holds for a reading against a form of "
        "patching when both hold against that form.", "",
        "| reading | kind | R [95% CI] (bias) | vs floor: counted / amortised | vs "
        "naive-batched: counted / amortised | pair holds vs floor (counted / amortised) | "
        "pair holds vs naive (counted / amortised) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = fam["methods"][r["method"]]
        lines.append(
            f"| {r['method']} | {KIND.get(r['method'], 'steering')} | {_f(r['R'])}{_ci(e)} | "
            f"{_f(r['ratio_floor'], 4)} / "
            f"{_f(r['ratio_amortised_floor'], 4)} | {_f(r['ratio_naive_batched'], 4)} / "
            f"{_f(r['ratio_amortised_naive_batched'], 4)} | "
            f"{_yes(r['holds_ratio_floor'])} / {_yes(r['holds_ratio_amortised_floor'])} | "
            f"{_yes(r['holds_ratio_naive_batched'])} / "
            f"{_yes(r['holds_ratio_amortised_naive_batched'])} |")
    lines += ["", verdict_sentence(rows), ""]
    return lines


def verdict_sentence(rows):
    """Which readings reproduce the paper's pair, against which form (steering readings
    first; controls and baselines said apart)."""
    parts = []
    for kind, label in (("steering", "steering readings"), ("control", "random-direction "
                                                                       "controls"),
                        ("baseline", "baselines without a vector")):
        chosen = [r for r in rows if KIND.get(r["method"], "steering") == kind]
        parts.append(f"{label.capitalize()}: " + _holds(chosen))
    return "**The paper's pair (R >= 0.88 at <= 0.05 of patching's compute).** " + " ".join(parts)


def _holds(rows):
    found = []
    for r in rows:
        forms = [f"{FORM_NAMES[form]} ({kind})" for form in FORMS
                 for kind, key in (("counted", "ratio"), ("amortised", "ratio_amortised"))
                 if r[f"holds_{key}_{form}"]]
        if forms:
            sure = "its whole interval" if r["ci_above"] else "its point, not its whole interval,"
            found.append(f"{r['method']} against " + ", ".join(forms)
                         + f" ({sure} at or above 0.88)")
    reach = [r["method"] for r in rows if r["R_reaches"]]
    if not found:
        return ("it holds for none, against either form (R >= 0.88: "
                + (", ".join(reach) or "none") + ").")
    return "it holds for " + "; ".join(found) + "."


def family_lines(name, f):
    lines = [f"## Methods, {name} tasks ({len(f['tasks'])})", "",
             "| method | R [95% CI] (bias) | seeds mean ± sd (range) | v2 grid R (S* v3) | "
             "v2 R (v2 S*) | R signed | R' | R'' | Spearman | top-10% | time ratio | "
             "counted FLOPs ratio | peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|"
             "---|---|"]
    for m in SHOWN:
        e = f["methods"][m]
        s, c = e["seeds"], e.get("compute") or {}
        seeds = (f"{_f(s['mean'])} ± {_f(s['sd'])} ({_f(s['min'])}–{_f(s['max'])}, "
                 f"{s['combinations']})") if s else "n/a"
        lines.append(
            f"| {m} | {_f(e['value'])}{_ci(e)} | {seeds} | {_f(e['R_grid'])} | "
            f"{_f(e['v2_R'])} | {_f(e['R_signed'])} | {_f(e['R_prime'])} | "
            f"{_f(e['R_skill'])} | {_f(e['spearman'])} | {_f(e['top10_recall'], 2)} | "
            f"{_f(c.get('ratio_seconds'), 3)} | {_f(c.get('ratio_counted_flops'), 3)} | "
            f"{_f(c.get('peak_memory_mb'), 1)} |")
    return lines + [""]


def task_lines(results):
    lines = ["## Per task (mean over runs; S1-proj's interval from the hierarchical bootstrap)",
             "", "| task | family | runs | S* (min) | in headline | even share | S1-proj "
             "[95% CI] | S1-proj-abs | S1-lin | S1-exact | S1-exact-odd | S1-class | S2 | AtP "
             "| norm | random | recovery top-1 / top-5% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in results["tasks"].items():
        m = t["methods"]
        lines.append(
            f"| {name} | {t['family']} | {t['runs']} | {t['informative_sites']:.1f} "
            f"({t['informative_sites_min']}) | {'yes' if t['headline'] else 'no (|S*| < 10)'} "
            f"| {_f(t['even_share'], 2)} | {_f(m['S1-proj']['R'])}{_ci(m['S1-proj'])} | "
            + " | ".join(_f(m[k]["R"]) for k in ("S1-proj-abs", "S1-lin", "S1-exact",
                                                 "S1-exact-odd", "S1-class", "S2", "AtP",
                                                 "norm", "random"))
            + f" | {_recovery(t['recovery']['top1'])} / {_recovery(t['recovery']['top5pct'])} |")
    return lines + [""]


def _recovery(entry):
    if entry["ratio"] is None:
        return f"undefined (sum g {_f(entry['sum_g'], 2)})"
    return f"{entry['ratio']:.2f}{_ci(entry)}"


def model_lines(results):
    models = results.get("models") or []
    if not models:
        return []
    lines = ["## Task models", "", "| task | training seed | steps | held-out accuracy | "
             "train s (threads) | weights sha256 | same as committed |", "|---|---|---|---|---|"
             "---|---|"]
    for m in models:
        same = {True: "yes", False: "**no: another model**", None: "n/a"}[m.get("matches")]
        lines.append(f"| {m['task']} | {m['train_seed']} | {m['train_steps']} | "
                     f"{m['held_out_accuracy']:.4f} | {m.get('train_seconds')} "
                     f"({m.get('threads')}) | `{m['weights_sha256'][:16]}` | {same} |")
    total = sum(m.get("train_seconds") or 0 for m in models)
    lines += ["", f"Training (separate from the benchmark's time): {total / 60:.1f} CPU-minutes "
              f"for these {len(models)} models, one thread each (the excluded ones are not in "
              "this table)."]
    return lines + [""]


def memory_lines(results):
    mem = results.get("memory") or {}
    if not mem.get("stages"):
        return []
    meas = ((results.get("realistic") or {}).get("gpt2-small") or {}).get("measured") or {}
    gpt2 = {s["name"]: s["peak_memory_mb"] for s in meas.get("stages", [])}
    lines = ["## Peak memory per stage", "",
             "MB above the process's level before the stage (CPU: the peak of the stage's "
             "own tensor allocations, from the torch profiler's memory events in time "
             "order; CUDA: the allocator's peak).", "",
             "| stage | task models: mean (max) | gpt2-small, measured |", "|---|---|---|"]
    for name, v in mem["stages"].items():
        lines.append(f"| {name} | {_f(v['mean_mb'], 1)} ({_f(v['max_mb'], 1)}) | "
                     f"{_f(gpt2.get(name), 1)} |")
    by_task = sorted(mem["by_task"].items(), key=lambda kv: kv[1]["star"])
    if len(by_task) > 1:
        (lo_t, lo), (hi_t, hi) = by_task[0], by_task[-1]
        lines += ["", f"Against |S\\*|: patching's peak is {_f(lo.get('patching'), 1)} MB on "
                  f"{lo_t} (|S\\*| {lo['star']:.0f}) and {_f(hi.get('patching'), 1)} MB on "
                  f"{hi_t} (|S\\*| {hi['star']:.0f}); the caches do not depend on |S\\*|."]
    return lines + [""]


def compute_lines(results):
    lines = []
    lines += memory_lines(results)
    agree = results.get("stage_agreement", {})
    if agree:
        lines += ["FlopCounterMode vs the analytic count of what ran, worst relative gap per "
                  "stage: " + ", ".join(f"{k} {v['max_relative_gap']:.2f}"
                                       + ("" if v["within_25pct"] else " (over 25%)")
                                       for k, v in agree.items()) + ".", ""]
    real = results.get("realistic")
    if not real:
        return lines
    lines += ["## Compute at realistic sizes", "",
              f"Random-init models, {real['tokens']} tokens, prompts differing at column "
              f"{real['contrast']} (S* = layers 1..L-1 from there on); FLOPs by the same "
              "rules and pair counts as the benchmark.", "",
              "| method | " + " | ".join(f"{n}: vs floor counted / amortised | {n}: vs naive "
                                         "counted / amortised" for n in ("gpt2-small",
                                                                         "llama-1.1b"))
              + " | gpt2-small measured run: FLOPs ratio vs floor / time ratio | peak MB |",
              "|---|---|---|---|---|---|---|"]
    meas = (real["gpt2-small"].get("measured") or {}).get("methods", {})
    for m in real["gpt2-small"]["methods"]:
        cells = []
        for n in ("gpt2-small", "llama-1.1b"):
            c = real[n]["methods"][m]
            cells += [f"{_f(c['ratio']['floor'], 4)} / {_f(c['ratio_amortised']['floor'], 4)}",
                      f"{_f(c['ratio']['naive_batched'], 4)} / "
                      f"{_f(c['ratio_amortised']['naive_batched'], 4)}"]
        mm = meas.get(m, {})
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_f(mm.get('ratio_floor'))} / "
                     f"{_f(mm.get('ratio_seconds'))} | {_f(mm.get('peak_memory_mb'), 1)} |")
    g = real["gpt2-small"].get("measured")
    if g:
        p = g["methods"]["patching"]
        lines += ["", f"The measured run on gpt2-small ({g['device']}, {g['pairs']} pairs in "
                  f"every split and stage on both sides, median of {g['repeats']}): its FLOPs "
                  "ratio priced at those pair counts beside its time ratio; patching "
                  f"{_f(p['seconds'], 2)} s, peak {_f(p['peak_memory_mb'], 1)} MB above the "
                  "process's level. Fewer pairs weigh the fixed fitting cost more."]
    return lines + [""]


def _title(results):
    return [f"# Attribution benchmark, protocol v{results['protocol']['version']} "
            f"({results['protocol']['document']}), scale `{results['settings']['scale']}`", ""]


def excluded_lines(results):
    """One line per task model the 95% rule left out."""
    out = []
    for e in results.get("excluded_models", []):
        depth = e.get("depth_accuracy")
        reach = (f"; by depth, {min(depth, key=int)}-{max(depth, key=int)} hops: " + ", ".join(
            f"{depth[k]:.2f}" for k in sorted(depth, key=int))) if depth else ""
        out += [f"Excluded: {e['task']} training seed {e['train_seed']} (held-out accuracy "
                f"{e['held_out_accuracy']:.3f} < 0.95{reach}; its runs are left out, not "
                f"missing).", ""]
    return out


def no_verdict_markdown(results):
    """results.md of a scale whose every task model is below 95%: no verdict, and which."""
    n = len(results["excluded_models"])
    return "\n".join(_title(results) + scope_lines(results) + [
        f"**No verdict at this scale: every task model ({n}) is below 95% held-out accuracy.** "
        "The protocol leaves such a model out and lists it; nothing was measured on them, "
        "so this scale adds no run to the verdict (per scale or together).", ""]
        + excluded_lines(results))


def is_subset(scope):
    """Whether a run's scope (results.json "scope") is less than its scale's whole run."""
    return bool(scope) and not (set(scope["tasks"]) == set(scope["scale_tasks"]) and set(
        scope["train_seeds"]) == set(scope["scale_train_seeds"]))


def subset_text(scope):
    """What a subset of a scale's run holds: its tasks and training seeds of the whole."""
    return (f"tasks {', '.join(scope['tasks'])} of {', '.join(scope['scale_tasks'])}; "
            f"training seeds {', '.join(map(str, scope['train_seeds']))} of "
            f"{', '.join(map(str, scope['scale_train_seeds']))}")


def scope_lines(results):
    """A run of some of a scale's tasks or training seeds says so first: its numbers are
    that subset's, not the scale's verdict."""
    sc = results.get("scope")
    if not is_subset(sc):
        return []
    scale = results["settings"]["scale"]
    return [f"**Scope: a subset of the {scale} scale's run**: {subset_text(sc)}. "
            f"These numbers are that subset's, not the scale's verdict.", ""]


def markdown(results):
    env, st = results["environment"], results["settings"]
    lines = _title(results)
    if results.get("partial"):
        miss = results["missing_runs"]
        by_model = Counter((task, seed) for task, seed, _ in miss)
        models = ", ".join(f"{t} seed {s} ({n})" for (t, s), n in sorted(by_model.items()))
        lines += [f"**Partial: {results['runs_done']} of {results['runs_total']} runs** "
                  f"(missing {len(miss)}: {models}; rerun the same command to complete them, "
                  f"training first any of these models not yet trained).", ""]
    lines += scope_lines(results) + excluded_lines(results)
    if results.get("left_out_small_star"):
        lines += [("Left out of the headline (|S*| < 10): " if results["headline_rule_met"]
                   else "**No task reaches |S*| >= 10 at this scale; every number below is "
                   "over all tasks, outside the protocol's headline rule.** |S*| < 10: ")
                  + ", ".join(results["left_out_small_star"]) + ".", ""]
    changed = [m for m in results.get("models", []) if m.get("matches") is False]
    if changed:
        lines += [f"**{len(changed)} task model(s) differ from the committed results' weights** "
                  "(sha256): these numbers come from differently trained models.", ""]
    lines += v4_lines(results) + ["## Protocol v3's columns (beside v4's)", ""]
    lines += verdict_lines(results)
    for name, f in results["families"].items():
        lines += family_lines(name, f)
    lines += task_lines(results) + model_lines(results) + compute_lines(results)
    lines += [f"Run on {env['device']} ({env.get('torch_threads')} torch threads); torch "
              f"{env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
              f"commit {env['commit']}; {results['runs_done']} runs "
              f"({results.get('runs_resumed', 0)} resumed from shards) in "
              f"{results.get('total_seconds', 'n/a')} s; settings {json.dumps(st)}."]
    return "\n".join(lines)
