"""The lock that keeps a second run off an output while one writes it."""
from __future__ import annotations

import fcntl
import os


def lock_for_life(fd: int, busy: Exception) -> str:
    """An exclusive flock on `fd` for this process's life (the kernel drops it when the process dies,
    killed or not): two runs of one command (a requeued job whose first copy still runs, a second
    terminal) would both write the same output. Raises `busy`, closing `fd`, when another process
    holds the lock; -> "" once locked, or why no lock could be taken (a file system without locks,
    some network mounts), for the caller to note or pass over."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise busy from None
    except OSError as e:
        return e.strerror or str(e)
    return ""
