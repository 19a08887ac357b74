"""Worker processes that end with the process that started them, and a pool stopped without
waiting for the work in flight."""
from __future__ import annotations

import ctypes
import os
import signal
import threading

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a process started by `parent_pid`: end when it ends. A checkpoint writer left behind by a
    killed run would go on writing into a `.partial` directory nobody finalizes (and a restarted
    run saving the same step would find its files changing under it); a results server left
    behind would hold the trainer's memory for good; a data build's or a shard pass's worker would
    wait for work forever (a build's holding the shard's lock)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: look for the parent instead
        def watch():
            while os.getppid() == parent_pid:
                threading.Event().wait(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the trainer ended before the signal was asked for
        os._exit(1)


def kill_workers(pool) -> None:
    """Kills the worker processes of a concurrent.futures ProcessPoolExecutor: a pass stopped early
    (an error, SIGTERM, Ctrl-C, a caller done with it) wants nothing more of the work in flight, which
    shutdown() would wait for. Python 3.11 has no public call for it (3.14's kill_workers)."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        p.kill()
