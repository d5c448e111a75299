"""The ``steerops`` command answers every user error with one line and exit 2 (never a
traceback), handles cut-short shards and concurrent runs, and starts fast."""
import os
import stat
import subprocess
import sys
import time

import pytest

from steerops.bench.provenance import read_shard
from steerops.app.cli import main
from steerops.app.cli_args import FolderLock, UsageError


def _run(argv, capsys):
    """(exit status, stderr) of ``steerops ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _one_line_error(err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0], err
    for w in words:
        assert w in lines[0], (w, err)


ATTRIBUTION = ["bench", "attribution", "--quick", "--no-progress", "--no-realistic"]


@pytest.mark.parametrize("extra,words", [
    (["--threads", "0"], ["--threads", "positive integer"]),
    (["--threads", "two"], ["--threads"]),
    (["--device", "nodevice"], ["--device", "unknown device 'nodevice'"]),
    (["--tasks"], ["--tasks"]),
    (["--tasks", "nope"], ["--tasks", "nope"]),
    (["--train-seeds", "-1"], ["--train-seeds"]),
    (["--checkpoints", "/no/such/folder"], ["--checkpoints", "no such folder"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_attribution_bad_options(extra, words, capsys):
    code, err = _run(ATTRIBUTION + extra, capsys)
    assert code == 2
    _one_line_error(err, *words)


def test_device_cuda_without_cuda(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the error is for machines without it")
    for argv in (ATTRIBUTION, ["bench", "patching"], ["bench", "overhead"]):
        code, err = _run(argv + ["--device", "cuda"], capsys)
        assert code == 2
        _one_line_error(err, "--device", "cuda")


def test_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    code, err = _run(ATTRIBUTION + ["--out", str(a_file)], capsys)
    assert code == 2
    _one_line_error(err, "--out", "is a file, not a folder")
    code, err = _run(ATTRIBUTION + ["--out", str(a_file / "below")], capsys)
    assert code == 2
    _one_line_error(err, "--out", "is a file")
    if os.geteuid() == 0:
        return  # root writes anywhere: only the file cases apply
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    code, err = _run(ATTRIBUTION + ["--out", str(locked / "out")], capsys)
    assert code == 2
    _one_line_error(err, "--out", "not writable")


def test_out_under_a_read_only_folder_is_refused(tmp_path, monkeypatch, capsys):
    """The writability check itself (root writes anywhere, so access() is stubbed)."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    code, err = _run(ATTRIBUTION + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2
    _one_line_error(err, "--out", "not writable")


def test_report_only_on_an_empty_folder(tmp_path, capsys):
    code, err = _run(ATTRIBUTION + ["--report-only", "--out", str(tmp_path / "empty")], capsys)
    assert code == 2
    _one_line_error(err, "--report-only: no finished runs", "run without --report-only first")


def test_bad_options_of_every_benchmark(tmp_path, capsys):
    cases = [["bench", "patching", "--pairs", "0"], ["bench", "patching", "--repeats", "-2"],
             ["bench", "patching", "--configs"], ["bench", "overhead", "--hidden", "0"],
             ["bench", "overhead", "--device", "gpu9"], ["bench", "kernels", "--K", "0"],
             ["bench", "kernels", "--ops"], ["bench", "compile", "--workers", "0"],
             ["bench", "nope"], ["--nope"]]
    for argv in cases:
        code, err = _run(argv, capsys)
        assert code == 2, argv
        _one_line_error(err)


def test_bare_commands_print_usage_and_exit_2(capsys):
    for argv in ([], ["bench"]):
        code, err = _run(argv, capsys)
        assert code == 2
        assert "usage: steerops" in err and "Traceback" not in err


def test_help_names_no_file_a_user_lacks(capsys):
    for argv in (["--help"], ["bench", "--help"], ["bench", "attribution", "--help"],
                 ["bench", "kernels", "--help"], ["bench", "patching", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "PROTOCOL.md" not in out and "SPEC.md" not in out and "%%" not in out, argv
    import steerops
    for name in steerops.__all__:
        doc = getattr(steerops, name).__doc__ or ""
        assert "SPEC.md" not in doc and "PROTOCOL.md" not in doc, name


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time; t = time.perf_counter(); from steerops.app.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "print(time.perf_counter() - t, file=sys.stderr)")
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: steerops" in r.stdout
    assert float(r.stderr.strip().splitlines()[-1]) < 0.5
    assert time.perf_counter() - started < 30  # the interpreter's start included, loosely


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    from steerops.bench import attribution

    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(attribution, "main", interrupted)
    code, err = _run(["bench", "attribution"], capsys)
    assert code == 130
    _one_line_error(err.replace("interrupted", "error: interrupted"), "run the same command again")


def test_folder_lock_refuses_a_second_holder(tmp_path):
    with FolderLock(str(tmp_path)):
        with pytest.raises(UsageError, match=rf"another run \(pid {os.getpid()}\) is writing"):
            with FolderLock(str(tmp_path)):
                pass
    with FolderLock(str(tmp_path)):  # released: free again
        pass


def test_a_second_run_on_one_folder_is_refused(tmp_path, capsys):
    """A run holding --out (here: another process) makes a second one exit 2 at once."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from steerops.app.cli_args import FolderLock\n"
                               "with FolderLock(sys.argv[1]):\n    print('held', flush=True)\n"
                               "    time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = _run(ATTRIBUTION + ["--tasks", "ioi", "--out", str(tmp_path)], capsys)
        assert code == 2
        _one_line_error(err, f"another run (pid {holder.pid}) is writing {tmp_path}")
    finally:
        holder.kill()
        holder.wait()


def test_cut_short_shard_is_named_set_aside_and_recomputed(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert _run(ATTRIBUTION + ["--tasks", "ioi", "--out", out], capsys)[0] == 0
    shards = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(out, "runs"))
              for f in files if f.endswith(".json.gz")]
    assert len(shards) == 1
    whole = read_shard(shards[0])
    with open(shards[0], "rb") as f:
        data = f.read()
    with open(shards[0], "wb") as f:
        f.write(data[:200])  # a writer killed mid-file
    code, err = _run(ATTRIBUTION + ["--tasks", "ioi", "--out", out], capsys)
    assert code == 0
    assert f"set aside {shards[0]}" in err and "recomputed" in err
    assert os.path.exists(shards[0] + ".unreadable")
    again = read_shard(shards[0])
    assert again["methods"] == whole["methods"]  # recomputed, the same numbers
