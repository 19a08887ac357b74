"""argparse types the entry scripts share (a bad count is refused by argparse, naming the flag, before
anything is loaded)."""
from __future__ import annotations

import argparse


def count_at_least(low: int):
    """An argparse type: an int of at least `low` (a bad count stopped with a traceback, after the
    model was loaded for --max-length, at start-up for --tp 0)."""
    def count(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    count.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return count


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, refusing an unknown option as `polar pretrain` does: with the option nearest it
    (`polar data build ... --seq-lenght 5`: `unrecognized arguments: --seq-lenght (did you mean
    --seq-length?) 5`), where argparse named the word alone. Only the message changes: parse_args stays
    argparse's, so what patches it (tests/gpu/argcheck.py, polar/cli.py's _options_of) still reaches it."""

    _unknown: list = []

    def parse_known_args(self, args=None, namespace=None):
        namespace, self._unknown = super().parse_known_args(args, namespace)
        return namespace, self._unknown

    def error(self, message):
        if self._unknown and message == f"unrecognized arguments: {' '.join(self._unknown)}":
            from engine.near_miss import unrecognized

            message = unrecognized(self._unknown, list(self._option_string_actions))
        super().error(message)
