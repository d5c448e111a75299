"""Where a result came from: git commit, device and library versions."""
import json
import math
import os
import platform
import subprocess

import torch


def repo_relative(path):
    """``path`` relative to the repository root when it lies inside it (result files
    must not carry the absolute paths of the machine that wrote them)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(path)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def git_commit():
    """Short commit hash, with "+dirty" when the working tree has uncommitted
    changes (the result then did not come from that commit alone). Committed result
    files (bench/results/) are outputs, not code: rewriting them does not count.
    STEEROPS_COMMIT, when set, wins: a copy of the tree sent to a GPU machine has no
    git checkout of its own, or a stale one (seen: an older commit, not marked dirty)."""
    if os.environ.get("STEEROPS_COMMIT"):
        return os.environ["STEEROPS_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                         stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no",
                                         "--", ".", ":(exclude)bench/results"],
                                        cwd=os.path.dirname(here),
                                        stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return None
    return commit + ("+dirty" if dirty else "")


def cpu_model():
    """The CPU's model name (trained weights depend on it: docs/protocol.md,
    "Reproducible models"); platform.processor() says only "x86_64" on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment():
    import transformers
    import triton

    import steerops
    dev = ("cuda: " + torch.cuda.get_device_name()) if torch.cuda.is_available() else \
        f"cpu: {cpu_model()}, {os.cpu_count()} cores"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "commit": git_commit(), "steerops": steerops.__version__}


def strict_json(value):
    """``value`` with NaN/Inf as None and numpy scalars/arrays as Python: what
    ``json.dump(allow_nan=False)`` accepts, so any JSON reader can load it."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy / torch
        return strict_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path, result):
    """Strict JSON, written to a temporary file and renamed: a reader (or a
    killed run) never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict_json(result), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def write_shard(path, result):
    """A run shard, compressed (gzip without a timestamp: the same run gives the same
    bytes), written atomically."""
    import gzip
    tmp = path + ".tmp"
    text = json.dumps(strict_json(result), separators=(",", ":"), allow_nan=False)
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                               filename="") as f:
        f.write(text.encode())
    os.replace(tmp, path)


def read_shard(path):
    """A shard written by :func:`write_shard` (or a plain JSON file)."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def save_results(out_dir, stem, result, table=None):
    """``<stem>.json`` (the full record) and ``<stem>.md`` (the table) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{stem}.json"), result)
    if table is not None:
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            f.write(table + "\n")
