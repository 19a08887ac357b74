"""The program name an entry script's usage and error lines lead with: the command the user typed."""
from __future__ import annotations

import os
import sys


def called_as(spec, command: str) -> str:
    """`command` (`polar score`) where polar started the entry script (polar's command line imports
    its module; its launcher runs `-m engine.score` under torchrun); the file's name where the user
    ran the file itself (python or torchrun engine/score.py), as argparse names a script. `spec`: the
    entry module's __spec__, None only in a module run from its file."""
    return command if spec is not None else os.path.basename(sys.argv[0])
