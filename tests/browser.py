"""Headless Chromium for the HTML reports: the page's DOM after its scripts ran, and
a screenshot. CI installs Debian's chromium (.ci/run) and sets
STEEROPS_REQUIRE_BROWSER=1, so a missing browser fails there instead of skipping."""
import os
import shutil
import subprocess
import tempfile

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("STEEROPS_REQUIRE_BROWSER") == "1":
        pytest.fail("no chromium on PATH, and STEEROPS_REQUIRE_BROWSER=1 (CI installs it)")
    pytest.skip("no chromium on PATH (apt-get install chromium)")


def _run(args):
    with tempfile.TemporaryDirectory() as profile:
        # no network: file:// pages only, and the page must need none
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


def dump_dom(html_path):
    out = _run(["--dump-dom", f"file://{os.path.abspath(html_path)}"])
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def screenshot(html_path, png_path, size=(1400, 900)):
    out = _run([f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}",
                f"file://{os.path.abspath(html_path)}"])
    assert out.returncode == 0 and os.path.isfile(png_path), out.stderr[-2000:]
    import matplotlib.image
    return matplotlib.image.imread(png_path)
