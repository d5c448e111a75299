"""The ``steerops`` command: ``steerops {patch,attribute,steer,tiny-model}`` on a local
model folder, and ``steerops bench {attribution,kernels,overhead,patching,combine,compile}``.

Arguments are parsed before anything heavy is imported (``steerops --help`` does not
load torch). Every user error is one line on stderr and exit status 2; Ctrl-C is one
line that says how to resume.
"""
import sys

from .cli_args import Parser, UsageError, report_user_error

BENCHMARKS = {
    "attribution": ("attribution", "the main job: the patching-vs-steering attribution "
                                   "benchmark (docs/protocol.md) on 12 task models"),
    "kernels": ("kernels", "kernel benchmarks vs eager PyTorch and torch.compile (CUDA GPU)"),
    "overhead": ("overhead", "per-forward cost of steering vs a plain hook"),
    "patching": ("patching", "patching sweep forms side by side: reuse vs plain vs hook loops"),
    "combine": ("combine", "the v4 verdict per scale and together, from finished runs of "
                           "several scales"),
    "compile": ("compile_check", "compile every kernel specialization for sm_90a / sm_80 "
                                 "without a GPU: registers, spills, local memory"),
}
INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


COMMANDS = {  # module, function, help (the modules import torch: loaded on use)
    "patch": ("commands", "patch_main", "activation patching from text prompts on a local "
                                        "model folder: JSON, heatmap, HTML report"),
    "attribute": ("commands", "attribute_main", "attribution patching (AtP) from text prompts; "
                                                "--compare: beside the patching sweep"),
    "steer": ("commands", "steer_main", "unsteered and steered generations side by side"),
    "tiny-model": ("tiny", "main", "build a tiny local model + tokenizer (offline) to try "
                                   "the commands on"),
}


def _parser():
    p = Parser(prog="steerops", description="steerops: fused steering and activation-patching ops.",
               epilog="Each command has its own --help, e.g. steerops bench attribution --help")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (_, _, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    bench = sub.add_parser("bench", help="run a benchmark", description="Run a benchmark.",
                           epilog="Each benchmark has its own --help.")
    which = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", parser_class=Parser)
    for name, (_, text) in BENCHMARKS.items():
        # options are parsed by the benchmark's own parser (add_help=False: its --help wins)
        which.add_parser(name, help=text, add_help=False)
    return p, bench


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except UsageError as e:
        return report_user_error("steerops", e)
    except KeyboardInterrupt:
        print("steerops: interrupted. Finished work is kept: run the same command again to "
              "resume where it stopped.", file=sys.stderr)
        return INTERRUPTED


def _main(argv):
    parser, bench = _parser()
    if argv and argv[0] in COMMANDS:
        import importlib
        module, function, _ = COMMANDS[argv[0]]
        code = getattr(importlib.import_module(f"steerops.app.{module}"), function)(argv[1:])
        return code if isinstance(code, int) else 0
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        import importlib
        module = importlib.import_module(f"steerops.bench.{BENCHMARKS[argv[1]][0]}")
        code = module.main(argv[2:])
        return code if isinstance(code, int) else 0
    args = parser.parse_args(argv)  # --help, or an unknown command: argparse says so
    # a command is required: a bare `steerops` and a bare `steerops bench` both print
    # the usage and exit 2, as argparse does for any missing argument
    (parser if args.command is None else bench).print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
