"""Output into a pipe whose reader has gone (`engine/pretrain.py --print-config | head -1`).

Python ignores SIGPIPE, so a write into such a pipe raises BrokenPipeError; caught, the program
still fails again when the interpreter flushes stdout at exit, with a traceback about the flush.
"""
from __future__ import annotations

import os
import sys


def reader_gone() -> int:
    """Points stdout at /dev/null, so the flush at exit has nowhere to fail, and returns exit code 1
    (the reader left before the output was written: the command did not finish what it was asked)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
