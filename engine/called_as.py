"""The program name an entry script's usage and error lines lead with: the command the user typed.

One rule for engine/pretrain.py, finetune.py, score.py and evaluate.py. polar says so where it runs an
entry: in the environment of the processes it launches (its start-up check, torchrun and so its workers)
it sets COMMAND_ENV to its command (`polar finetune`), and where it runs one in its own process (`polar
score --nproc 1`) it passes the name to the entry's main. Nothing else is taken for polar: a user's own
`python -m engine.score` is named so, not `polar score`, and the file run itself by the path typed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

COMMAND_ENV = "POLAR_COMMAND"  # set by polar (polar/cli.py, polar/launch.py) for the processes it launches


def launched_env(command: str, env: dict | None = None) -> dict:
    """The environment for a process that polar launches to run `command` (`polar pretrain`): `env`
    (default this process's) with COMMAND_ENV set."""
    return {**(os.environ if env is None else env), COMMAND_ENV: command}


def called_as(module: str, prog: str | None = None) -> str:
    """The name of the entry `module` (`engine.score`) as the user called it: `prog` where the caller
    gives one (polar running the entry in its own process); COMMAND_ENV's command where polar launched
    this process; the path as typed where this entry's file is the program run (python or torchrun
    engine/score.py: torchrun passes the path on to its workers as given); else `python -m MODULE`,
    which runs it (its own -m run, or another program calling its main)."""
    if prog:
        return prog
    command = os.environ.get(COMMAND_ENV, "").strip()
    if command:
        return command
    main = sys.modules.get("__main__")
    where = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is None and where and sys.argv[0] \
            and Path(where).resolve().with_suffix("").parts[-len(module.split(".")):] == tuple(module.split(".")):
        return sys.argv[0]
    return f"{Path(sys.orig_argv[0]).name if sys.orig_argv else 'python'} -m {module}"
