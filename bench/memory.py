"""Peak memory of a piece of work on the CPU, where torch has no allocator
statistics (and tracemalloc does not see torch's allocations), read two ways:

- ``profiled_peak_mb``: the peak of the work's own tensor allocations, from the
  torch profiler's memory events (the attribution benchmark's stages). It sees
  memory the allocator reuses, which the resident set does not.
- ``peak_above_baseline_mb``: the process's peak resident set above what it held
  before, read from /proc (the patching-sweep benchmark's whole sweeps).

Linux lets a process reset its own peak (``echo 5 > /proc/self/clear_refs`` resets
VmHWM), so the peak of one call is measured without a fresh process; where that is
not possible, run the call in a child process (``in_child``) so that the peak is
that call's alone.
"""
import contextlib
import functools
import gc
import os
import sys


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


@functools.lru_cache(None)
def can_measure():
    try:
        _status_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_above_baseline_mb(fn):
    """(fn's result, peak resident MB above the resident MB before the call)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM")
    return result, (peak - before) / 1024


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the duration (C++ log lines included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiled_peak_mb(fn):
    """(fn's result, peak MB of the tensor memory fn allocates on the CPU beyond what
    was live before it), from the torch profiler's memory events: every allocation
    and free in time order, the peak of their running sum. Unlike the resident set,
    this sees memory the allocator reuses."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ side logs a line at every start and stop
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    # an allocation inside an op is reported as that op's own (self) memory, a free
    # outside any op as a "[memory]" event: each at its start, in time order (an op's
    # internal alloc-and-free nets out within it)
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]"
                     else e.self_cpu_memory_usage) for e in prof.events())
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return result, peak / 2 ** 20


def _child(conn, fn, args):
    try:
        conn.send(("ok", peak_above_baseline_mb(lambda: fn(*args))[1]))
    except BaseException as e:  # noqa: BLE001 (reported to the parent)
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def in_child(fn, *args):
    """Peak MB above baseline of ``fn(*args)`` run in a fresh forked process (what the
    parent allocated before the fork is shared, not counted)."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    status, value = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"child failed: {value}")
    return value


if __name__ == "__main__":
    print("peak measurable:", can_measure(), os.getpid())
