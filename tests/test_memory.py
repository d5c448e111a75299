"""The plain sweep keeps every batch inside memory_budget_mb, measured: the peak
resident memory of a child process above what it held before the sweep (torch's
CPU allocations are invisible to tracemalloc). The child runs with a fixed malloc
mmap threshold, so freed batch buffers leave the resident set and the peak is the
sweep's live demand (with glibc's default, freed blocks stay resident for reuse)."""
import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys, torch, transformers, steerops
from steerops.bench.memory import peak_above_baseline_mb
torch.set_num_threads(1)
T, budget, metric_kind = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
rows = None if sys.argv[4] == "auto" else int(sys.argv[4])
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=50257, n_positions=64)
model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
clean = torch.randint(0, 50257, (2, T))
corrupt = clean.clone(); corrupt[:, 2] += 1
if metric_kind == "last":
    metric = steerops.logit_diff(torch.tensor([5, 6]), torch.tensor([7, 8]))
else:  # reads every position: the head must run at all of them
    metric = lambda logits, pair_index: logits[:, :, 5].mean(-1) - logits[:, :, 7].mean(-1)
with torch.no_grad():
    model(clean[:1, :4])  # one-time allocations outside the measurement
kw = dict(reuse="none", memory_budget_mb=budget, progress=False, batch_size=rows)
plan = steerops.plan_sweep(model, clean, corrupt, metric, reuse="none", memory_budget_mb=budget,
                           batch_size=rows)
res, peak = peak_above_baseline_mb(lambda: steerops.patching_sweep(model, clean, corrupt,
                                                                    metric, **kw))
print(json.dumps({"peak_mb": peak, "batch_size": plan.batch_size, "forwards": res.forwards,
                  "head_last_only": res.extra["reuse"]["lm_head_last_only"]}))
"""


def _sweep_peak(T, budget, metric_kind, rows="auto"):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", CHILD, str(T), str(budget), metric_kind,
                          str(rows)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
@pytest.mark.parametrize("T,budget,metric_kind", [(32, 48, "last"), (16, 24, "last"),
                                                  (16, 96, "all")])
def test_plain_sweep_peak_within_budget(T, budget, metric_kind):
    out = _sweep_peak(T, budget, metric_kind)
    assert out["head_last_only"] == (metric_kind == "last")
    # the budget binds: the 2 x 5 x T (pair, site) rows need several batches
    assert out["batch_size"] < 2 * 5 * T and out["forwards"] > 3
    # the budget bounds the batches; what a sweep holds whatever its batches (the clean
    # store, the two base runs' full logits) is measured with one row per batch
    fixed = _sweep_peak(T, budget, metric_kind, rows=1)["peak_mb"]
    assert out["peak_mb"] <= budget + fixed, (out, fixed)
