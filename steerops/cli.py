"""The ``steerops`` command: ``steerops bench {attribution,kernels,overhead,compile} [options]``."""
import argparse
import sys

BENCHMARKS = {
    "attribution": ("attribution", "the main job: PROTOCOL.md patching-vs-steering benchmark "
                                   "on the 12 shipped task models"),
    "kernels": ("kernels", "kernel benchmarks vs eager PyTorch and torch.compile (CUDA GPU)"),
    "overhead": ("overhead", "per-forward cost of steering vs a plain hook"),
    "patching": ("patching", "patching sweep forms side by side: reuse vs plain vs hook loops"),
    "compile": ("compile_check", "compile every kernel specialization for sm_90a / sm_80 "
                                 "without a GPU: registers, spills, occupancy"),
}


def _parser():
    p = argparse.ArgumentParser(
        prog="steerops", description="steerops: fused steering and activation-patching ops.",
        epilog="Each command has its own --help, e.g. steerops bench attribution --help")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="run a benchmark", description="Run a benchmark.",
                           epilog="Each benchmark has its own --help.")
    which = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (_, text) in BENCHMARKS.items():
        # options are parsed by the benchmark's own parser (add_help=False: its --help wins)
        which.add_parser(name, help=text, add_help=False)
    return p, bench


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, bench = _parser()
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        import importlib
        module = importlib.import_module(f"steerops.bench.{BENCHMARKS[argv[1]][0]}")
        code = module.main(argv[2:])
        return code if isinstance(code, int) else 0
    args = parser.parse_args(argv)  # --help, or an unknown command: argparse says so
    if args.command is None:
        parser.print_help()
        return 0 if not argv else 2
    bench.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
