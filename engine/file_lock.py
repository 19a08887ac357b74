"""The lock that keeps a second run off an output while one writes it."""
from __future__ import annotations

import fcntl
import os
import socket
import time


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


def held(path: str) -> bool:
    """Whether another process holds lock_for_life on the file `path`, asked without taking it: a
    shared flock, let go at once (two asking at the same time do not see each other). False where
    the file is missing or the file system has no locks."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # lets go of the shared lock too
    return False


def holder(path: str) -> str:
    """Who holds the lock file `path`, as HolderLock wrote it."""
    try:
        return open(path, errors="replace").read().strip() or "its process unknown"
    except OSError:
        return "its process unknown"


class HolderLock:
    """lock_for_life on the file `path` (created), which then names its holder (pid, host, when) for
    a process refused by it, and is removed and let go by release(), or let go (left in place) by this
    process's death. Processes this one forks (a checkpoint writer) do not hold it: a child outliving
    a killed parent for a moment would keep the lock from the restarted job it was there for."""

    def __init__(self, path: str, busy: Exception):
        self.path, self.fd = path, None
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self.unlocked = lock_for_life(fd, busy)  # why no lock could be taken ("" once locked)
            # still the file under that name: a holder releasing it removes it before letting go, and
            # whoever opened it just before would otherwise hold a lock on a file nobody else sees
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        os.register_at_fork(after_in_child=self._drop_in_child)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n".encode(), 0)

    def _drop_in_child(self) -> None:
        # the child's copy of the descriptor alone: a flock lasts while any copy of it is open, and
        # flock(LOCK_UN) here would let go of the parent's lock too
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:  # removed by hand: let go all the same
                pass
            os.close(self.fd)
            self.fd = None
