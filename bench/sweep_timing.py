"""Timing forms of a sweep side by side: interleaved rounds with the order rotated,
and per-round ratios (shared by the patching benchmarks)."""
import statistics

from steerops.sweeps.costs import timed


def interleaved(forms, repeats, device):
    """Every form once per round, the order rotated each round, so that a change in the
    machine's load lands on all forms alike. Returns ({form: [seconds per round]},
    {form: result of its last run})."""
    names = list(forms)
    times, results = {f: [] for f in names}, {}
    for r in range(repeats):
        for form in names[r % len(names):] + names[:r % len(names)]:
            results[form], seconds = timed(forms[form], device)
            times[form].append(seconds)
    return times, results


def round_ratios(times, form, base):
    """Per-round ratios ``form / base`` (same round, same load): median and range."""
    ratios = [a / b for a, b in zip(times[form], times[base])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "per_round": ratios}
