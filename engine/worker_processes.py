"""Worker processes that end with the process that started them, and a pool stopped without
waiting for the work in flight."""
from __future__ import annotations

import ctypes
import os
import select
import signal
import threading

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parent_death_signal():
    """prctl(PR_SET_PDEATHSIG, sig) as a function of sig: the signal Linux sends a process when the
    thread that started it ends; None where there is no prctl (not Linux). Looked up at the call, so
    that a Popen preexec_fn made in the parent does not load a library in the forked child (dlopen's
    lock may be held by a thread the fork left behind)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return lambda sig: prctl(_PR_SET_PDEATHSIG, sig)


def die_with_parent(parent_pid: int) -> None:
    """In a process started by `parent_pid`: end when it ends. A checkpoint writer left behind by a
    killed run would go on writing into a `.partial` directory nobody finalizes (and a restarted
    run saving the same step would find its files changing under it); a results server left
    behind would hold the trainer's memory for good; a data build's or a shard pass's worker would
    wait for work forever (a build's holding the shard's lock).
    Started through multiprocessing's fork server ("forkserver", Python 3.14's default on Linux) its
    parent is that server, not `parent_pid`, and the server outlives `parent_pid` while its children
    live (each holds the server's pipe open): such a process watches `parent_pid` itself (_watch).
    It took the server for a dead `parent_pid` and ended at once: a data build with --workers 2
    failed on its first chunk."""
    parent = os.getppid()
    ask = parent_death_signal()
    if ask is not None:
        ask(signal.SIGKILL)
    else:  # not Linux: look for the parent instead
        def watch():
            while os.getppid() == parent:
                threading.Event().wait(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if parent != parent_pid:
        _watch(parent_pid)
    if os.getppid() != parent:  # the parent ended before the signal was asked for
        os._exit(1)


def _watch(pid: int) -> None:
    """End this process when process `pid` ends: a thread waits on a pidfd (readable once the process
    has ended; it cannot name another process that reuses the pid), or asks every second where there
    is none (Linux before 5.3, not Linux)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        def poll():
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    os._exit(1)
                except PermissionError:  # there, another user's
                    pass
                threading.Event().wait(1.0)
    else:
        def poll():
            select.select([fd], [], [])
            os._exit(1)

    threading.Thread(target=poll, name="die-with-parent", daemon=True).start()


def kill_workers(pool) -> None:
    """Kills the worker processes of a concurrent.futures ProcessPoolExecutor: a pass stopped early
    (an error, SIGTERM, Ctrl-C, a caller done with it) wants nothing more of the work in flight, which
    shutdown() would wait for. Python 3.11 has no public call for it (3.14's kill_workers)."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        p.kill()
