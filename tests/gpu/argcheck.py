"""A script's (or module's) own argparse reads the arguments given, and nothing after that runs:
tests/gpu/run_all.sh --dry-run checks each stage's command line with it, on any machine, in seconds.

    python3 tests/gpu/argcheck.py SCRIPT.py [ARGS...]
    python3 tests/gpu/argcheck.py -m MODULE [ARGS...]

Exit 2 with argparse's own message for a flag the script does not take or a value of the wrong type,
0 where it reads them; 1 where the script ended without parsing its arguments with argparse (then it
ran whole, which is no check).
"""
from __future__ import annotations

import argparse
import runpy
import sys


class Parsed(BaseException):
    """Raised by the first parse_args, after argparse accepted the arguments. Not a SystemExit: torchrun's
    main (@record) returns quietly on SystemExit(0), as if the run had ended."""


def main(argv: list[str]) -> int:
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)  # argparse's exit 2 on what it refuses
        raise Parsed()

    argparse.ArgumentParser.parse_args = parse_then_stop
    what = argv[1] if argv[0] == "-m" else argv[0]
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except Parsed:
        print(f"{what}: arguments accepted: {' '.join(argv[2 if argv[0] == '-m' else 1:])}")
        return 0
    print(f"{what} ended without parsing its arguments with argparse: nothing was checked", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
