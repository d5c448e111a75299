"""What makes a trained task model the same on any x86 machine and any supported
transformers release (docs/protocol.md, "Reproducible models"):

- the weights start from the benchmark's own seeded initialisation, not a
  library's ``_init_weights`` (whose draws and order change between releases):
  integers from torch's Mersenne Twister, turned into uniform values by exactly
  rounded arithmetic, so no vectorised transcendental (log, cos) can differ by an
  ulp between CPU code paths;
- training runs with the CPU math paths pinned (``PINNED_ENV``: torch's kernels,
  MKL's conditional numerical reproducibility, oneDNN's ISA) and one thread. The
  variables are read when torch loads, so a process that is not pinned trains in a
  child process that is (``pinned_command``); what was in force is recorded in
  every checkpoint (``math_paths``);
- training saves its whole state (weights, optimiser, schedule, data stream) every
  evaluation, so a killed run resumes where it stopped and ends with the weights
  an uninterrupted run ends with.
"""
import collections
import json
import os
import sys

import torch

# AVX2 is the widest path every x86-64 machine of the last decade has; pinning the
# narrower one means a machine with AVX-512 computes what one without it computes.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
              "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
INIT_STD = 0.02  # the Llama default's spread, drawn uniformly: a = std * sqrt(3)
_UNIFORM_BITS = 24


def math_paths():
    """The CPU math paths in force in this process (recorded with each model)."""
    from .provenance import cpu_model
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            **{k: os.environ.get(k) for k in PINNED_ENV}}


def is_pinned():
    """Whether this process computes on the pinned paths (its environment was set
    before torch loaded)."""
    return (all(os.environ.get(k) == v for k, v in PINNED_ENV.items())
            and torch.backends.cpu.get_cpu_capability().lower() == PINNED_ENV[
                "ATEN_CPU_CAPABILITY"])


def pinned_command(module_args):
    """(argv, env) that runs ``python -m <module_args>`` on the pinned math paths."""
    env = dict(os.environ, **PINNED_ENV)
    return [sys.executable, "-m", *module_args], env


def uniform_like(shape, bound, generator):
    """Uniform values in (-bound, bound) from 24-bit integers: k -> (2k + 1 - 2^24) / 2^24
    * bound, each step exactly rounded, the same bits on every machine."""
    k = torch.randint(0, 1 << _UNIFORM_BITS, tuple(shape), generator=generator,
                      dtype=torch.int64)
    unit = (2 * k + 1 - (1 << _UNIFORM_BITS)).to(torch.float64) / float(1 << _UNIFORM_BITS)
    return (unit * bound).to(torch.float32)


@torch.no_grad()
def seeded_init(model, seed):
    """Sets every parameter from ``seed`` alone: matrices (and embeddings) uniform with
    standard deviation INIT_STD, vectors (norm weights) to 1, biases to 0. Parameters
    are visited in sorted name order so a release that registers them in another order
    gets the same weights."""
    g = torch.Generator().manual_seed(int(seed))
    bound = INIT_STD * 3 ** 0.5
    for name, p in sorted(model.named_parameters()):
        if p.dim() >= 2:
            p.copy_(uniform_like(p.shape, bound, g).to(p.dtype))
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    return model


def save_state(path, *, model, opt, sched, gen, step, held_out, elapsed, plan=None,
               extra=None, machines=None):
    """The whole training state, written atomically (a kill never leaves half a file),
    with the ``plan`` (a dict) it was trained under, the loop's own ``extra`` state
    (a JSON-able dict: a curriculum's stage) and the ``machines`` it has run on (a
    training carried to another machine: bench/training_carry.py)."""
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "gen": gen.get_state(), "step": step,
                "held_out": held_out, "elapsed": elapsed,
                "plan": json.dumps(plan, sort_keys=True), "extra": json.dumps(extra),
                "machines": json.dumps(machines or [])}, tmp)
    os.replace(tmp, path)


Resumed = collections.namedtuple("Resumed", "step held_out elapsed extra machines")


def load_state(path, *, model, opt, sched, gen, plan=None, extra=None):
    """Restores what ``save_state`` wrote; returns a ``Resumed``: the step, held-out
    accuracy, elapsed seconds, the saved ``extra`` (``extra`` as given for a fresh
    start) and the machines it ran on. A state saved under another ``plan`` (or before
    plans were saved) is set aside as ``path``.stale and training starts from step 0:
    continuing it would give a model that no plan describes."""
    state = torch.load(path, weights_only=True)
    if state.get("plan") != json.dumps(plan, sort_keys=True):
        os.replace(path, path + ".stale")
        print(f"{path}: saved under another training plan; set aside as {path}.stale, "
              f"starting from step 0", file=sys.stderr)
        return Resumed(0, 0.0, 0.0, extra, [])
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    saved = json.loads(state.get("extra", "null"))  # states from before ``extra``: none
    return Resumed(state["step"], state["held_out"], state["elapsed"],
                   extra if saved is None else saved, json.loads(state.get("machines", "[]")))
