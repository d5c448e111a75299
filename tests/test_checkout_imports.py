"""Run from a checkout's root (python -m pytest, python -m steerops..., a REPL), the root
is on sys.path, so the folder kernels/ answers to the bare name `kernels`, which Hugging
Face's `kernels` distribution also uses (transformers imports it; a dependency from 5.25).
The bare name must go to the installed package where there is one, and steerops.kernels
must stay steerops' kernels either way."""
import importlib.machinery
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = os.path.join(ROOT, "kernels", "__init__.py")


def run_in_checkout(code, pythonpath=None):
    """Run `python -c code` with the checkout's root as the working directory (sys.path[0]);
    return its stdout lines."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_bare_name_goes_to_an_installed_kernels_package(tmp_path):
    installed = tmp_path / "kernels"
    installed.mkdir()
    (installed / "__init__.py").write_text("WHO = 'installed'\n")
    (installed / "layer.py").write_text("WHO = 'installed.layer'\n")
    out = run_in_checkout(
        "import kernels, kernels.layer, steerops.kernels as K\n"
        "print(kernels.WHO, kernels.layer.WHO, kernels.__file__, K.__file__, "
        "K.steer_fwd.__module__)", pythonpath=str(tmp_path))
    assert out == ["installed", "installed.layer", str(installed / "__init__.py"), OURS,
                   "steerops.kernels.steer"]


def test_bare_name_stays_ours_where_nothing_else_has_it():
    # transformers before 5.25 imports the bare name to read a version where it finds one
    # (5.24 does not catch ImportError there), so with no other `kernels` it must import;
    # the installed packages' folders holding one leave sys.path after steerops.kernels
    # has imported everything the kernels need
    out = run_in_checkout(
        "import os, sys, steerops.kernels as K\n"
        "sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) == os.getcwd()\n"
        "               or not os.path.isdir(os.path.join(p, 'kernels'))]\n"
        "import kernels\n"
        "print(kernels.__file__, kernels.steer_fwd.__module__, K.__file__)")
    assert out == [OURS, "kernels.steer", OURS]


def test_transformers_imports_from_the_checkout_root():
    # what this environment has besides the checkout decides what the bare name must give:
    # 5.25 imports the installed package (a dependency), 5.24 probes the bare name (ours
    # where nothing else has it), 4.48 does not import it
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    out = run_in_checkout(
        "import sys, transformers.activations, steerops.kernels as K\n"
        "bare = sys.modules.get('kernels')\n"
        "print(bare.__file__ if bare else 'not-imported', K.__file__, transformers.__version__)")
    assert out[1] == OURS
    assert out[0] in ("not-imported", spec.origin if spec is not None else OURS), out
