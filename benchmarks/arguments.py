"""Argument types the benchmark scripts share: a count below the least a script can run with is
argparse's usage error (exit 2, naming the option) before anything runs, not a traceback deep in
the run, a silent default, or a table of the wrong steps."""
import argparse
import math


def at_least(least, kind=int):
    """An argparse `type` for a number (`kind`) of at least `least`; with nargs, for each value."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value >= least:  # NaN too
            raise argparse.ArgumentTypeError(f"must be at least {least:g}, not {text}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, not {text}")
        return value
    return parse
