"""Where a result came from: git commit, device and library versions."""
import os
import platform
import subprocess

import torch


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return None


def environment():
    import transformers
    import triton

    import steerops
    dev = ("cuda: " + torch.cuda.get_device_name()) if torch.cuda.is_available() else \
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "commit": git_commit(), "steerops": steerops.__version__}


def save_results(out_dir, stem, result, table):
    """``<stem>.json`` (the full record) and ``<stem>.md`` (the table) in ``out_dir``."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
