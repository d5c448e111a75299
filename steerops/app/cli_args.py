"""Command-line plumbing shared by ``steerops`` and its benchmarks: a parser whose
errors are one line (exit 2), argument types that check what a user typed before
any work starts, and an exclusive lock on an output folder.

Nothing here imports torch at module level: ``steerops --help`` must stay fast.
"""
import argparse
import os
import sys


class UsageError(Exception):
    """A user error found after parsing (an empty folder, a busy --out): the
    ``steerops`` command prints it as one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit 2.

    An option given twice is an error (argparse would keep the last one silently), and
    a value that starts with '-' but is not an option (``--alpha -4,4``) is the value."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_args(self._checked(args), namespace)

    def _checked(self, args):
        out, seen = [], set()
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                return out + args[i:]
            name = a.split("=", 1)[0]
            action = self._option_string_actions.get(name) if a.startswith("-") else None
            if action is not None and not isinstance(action, (argparse._HelpAction,
                                                              argparse._VersionAction)):
                key = action.dest
                if key in seen:
                    self.error(f"{name} is given twice; give it once")
                seen.add(key)
                takes_one = action.nargs is None and action.option_strings and \
                    not isinstance(action, (argparse._StoreTrueAction,
                                            argparse._StoreFalseAction,
                                            argparse._StoreConstAction))
                nxt = args[i + 1] if i + 1 < len(args) else None
                if takes_one and "=" not in a and nxt is not None and nxt.startswith("-") \
                        and nxt not in self._option_string_actions:
                    out.append(f"{name}={nxt}")  # a negative value, not an option
                    i += 2
                    continue
            out.append(a)
            i += 1
        return out


# steerops.model.sites.SITE_KINDS' names, spelled here so that parsing imports no torch
# (tests/test_sites.py checks that the two agree)
SITE_KIND_NAMES = ("resid", "resid_mid", "attn_out", "mlp_out", "head_out", "neuron")


def _int_at_least(low, what):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


# argparse types: counts (threads, repeats, pairs, sizes) and seeds
positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def device(text):
    """argparse type: a torch device that exists on this machine."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r} (expected e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "meta":
        raise argparse.ArgumentTypeError("meta holds shapes only; use a device that computes")
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise argparse.ArgumentTypeError(
                f"{text}: this torch build ({torch.__version__}) has no CUDA support; install "
                f"a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu" and not _backend_available(torch, dev.type):
        raise argparse.ArgumentTypeError(f"{text}: device type {dev.type!r} is not available "
                                         f"in this torch build")
    return text


def _backend_available(torch, kind):
    for module in (getattr(torch.backends, kind, None), getattr(torch, kind, None)):
        check = getattr(module, "is_available", None)
        if check is not None:
            return bool(check())
    return False


def output_folder(text):
    """argparse type: a folder that is (or can be created) writable; not a file."""
    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    probe = path
    while not os.path.exists(probe):  # the nearest existing ancestor must be writable
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise argparse.ArgumentTypeError(f"{text}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {probe} is not writable")
    # root passes os.access everywhere; /proc and /sys still refuse a new folder: try one
    # (removed at once), so the command fails here and not after its work
    import tempfile
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".steerops-probe-", dir=probe))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: cannot create a folder in {probe} "
                                         f"({e.strerror or e})") from None
    return text


def existing_folder(text):
    """argparse type: a folder that exists."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(
            f"{text}: no such folder" if not os.path.exists(text) else f"{text} is not a folder")
    return text


class FolderLock:
    """An exclusive lock on an output folder (``OUT/.lock``, holding the owner's pid),
    so that two runs never write one folder's results or time each other's work.
    Released on exit, and by the OS if the process dies."""

    def __init__(self, folder):
        self.folder, self.path, self._file = folder, os.path.join(folder, ".lock"), None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock
            return self
        os.makedirs(self.folder, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise UsageError(f"another run (pid {owner}) is writing {self.folder}; wait for "
                             f"it to finish or give another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            import fcntl
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        return False


def report_user_error(prog, error):
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
