"""``steerops`` command line: ``steerops bench {attribution,kernels,overhead} ...``."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: steerops bench {attribution,kernels,overhead} [options]  (--help for each)"
    if len(argv) < 2 or argv[0] != "bench":
        print(usage, file=sys.stderr)
        return 2
    what, rest = argv[1], argv[2:]
    if what == "overhead":
        from .bench import overhead
        overhead.main(rest)
        return 0
    if what == "attribution":
        from .bench import attribution
        return attribution.main(rest)
    if what == "kernels":
        from .bench import kernels
        return kernels.main(rest)
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
