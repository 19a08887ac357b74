"""The lock that keeps a second run off an output while one writes it."""
from __future__ import annotations

import fcntl
import os
import re
import socket
import threading
import time
from typing import Callable, Union

Busy = Union[Exception, Callable[[], Exception]]  # or what makes it, asked only at a refusal

# A take that meets a lock tries again for about TRIES x PAUSE_S before it counts as another's: held()
# holds a shared lock for the moment it asks (microseconds), and a run's rank 0 taking its checkpoint
# directory's lock then was refused, "in use by another run", by a second command's --check-config.
# A lock held by a run is held for its life, so the pause only delays that refusal.
TRIES, PAUSE_S = 20, 0.01
# A lock waited for (wait_s: a run's checkpoint directory after a lost node, whose NFS lock outlives
# it by the server's lease time) is asked for again this often.
POLL_S = 1.0
# A HolderLock's holder refreshes its lock file's mtime this often, proof for a process waiting on another
# host that it is alive (Heartbeat): a lost node's NFS lock outlives its process by the server's lease,
# and nothing else told a live run there from that lease but the whole wait.
HEARTBEAT_S = 5.0


def waited(busy: Callable[[], bool], wait_s: float, waiting: Callable[[], None] | None = None,
           live: Callable[[], bool] | None = None) -> bool:
    """Asks busy() until it answers False or `wait_s` seconds have passed, every POLL_S; `waiting`
    is called once, when the first answer is busy and there is time to wait; `live` (a Heartbeat,
    say) is asked before each pause, and True ends the wait, busy. -> whether still busy."""
    deadline = time.monotonic() + wait_s
    if not busy():
        return False
    if wait_s > 0 and waiting is not None:
        waiting()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (live is not None and live()):
            return True
        time.sleep(min(POLL_S, left))
        if not busy():
            return False


def lock_for_life(fd: int, busy: Busy, wait_s: float = 0.0, waiting: Callable[[], None] | None = None,
                  live: Callable[[], bool] | None = None) -> str:
    """An exclusive flock on `fd` for this process's life (the kernel drops it when the process dies,
    killed or not): two runs of one command (a requeued job whose first copy still runs, a second
    terminal) would both write the same output. Raises `busy` (or what it makes, when callable),
    closing `fd`, when another process holds the lock (still, after `wait_s` seconds of asking again,
    `waiting` called once when that wait begins, or sooner once `live` says the holder is alive:
    waited's); -> "" once locked, or why no lock could be taken (a file system without locks, some
    network mounts), for the caller to note or pass over."""
    unlocked = []

    def refused() -> bool:
        for attempt in range(TRIES):
            if attempt:
                time.sleep(PAUSE_S)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            except OSError as e:
                unlocked.append(e.strerror or str(e))
            return False
        return True

    if waited(refused, wait_s, waiting, live):
        os.close(fd)
        raise (busy() if callable(busy) else busy) from None
    return unlocked[0] if unlocked else ""


def claim(path: str | os.PathLike, busy: Busy, directory: bool = False,
          flags: int = os.O_RDWR | os.O_CREAT, wait_s: float = 0.0,
          waiting: Callable[[], None] | None = None, live: Callable[[], bool] | None = None) -> tuple[int, str]:
    """lock_for_life on the file `path` (opened with `flags`, created), or with `directory` on the
    directory `path` (made), checked to be still the one under that name once locked: a holder letting
    go removes or renames it first (HolderLock.release, a conversion's publish, polar score's finished
    output), and whoever opened it just before would otherwise hold a lock on a file nobody else sees
    (or append to one renamed away). `wait_s`, `waiting`, `live`: lock_for_life's. -> (its descriptor,
    lock_for_life's answer)."""
    while True:
        if directory:
            os.makedirs(path, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:  # renamed away since it was made
                continue
        else:
            fd = os.open(path, flags, 0o644)
        unlocked = lock_for_life(fd, busy, wait_s, waiting, live)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd, unlocked
        except FileNotFoundError:
            pass
        os.close(fd)


def held(path: str) -> bool:
    """Whether another process holds lock_for_life on the file `path`, asked without taking it: a
    shared flock, let go at once (two asking at the same time do not see each other; one taking
    the lock meanwhile tries again, lock_for_life). False where the file is missing or the file
    system has no locks."""
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


def holder(path: str | os.PathLike) -> str:
    """Who holds a lock, as the file `path` names it (HolderLock's own, a conversion's owner file)."""
    try:
        with open(path, errors="replace") as f:
            return f.read().strip() or "its process unknown"
    except OSError:  # not written yet by a holder that has just taken the lock, or gone with it
        return "its process unknown"


def alive_here(path: str | os.PathLike) -> bool:
    """Whether the file `path` names (HolderLock's "pid P on HOST since T") a process alive on this
    host. A lock such a holder keeps is a live run's: the lease an NFS lock outlives its process by
    is a lost node's, as a live node's kernel lets go of a dead process's locks when it ends. False
    where the file names no holder, another host, or a pid not running here (another PID namespace
    under the same host name, say)."""
    m = re.match(r"pid (\d+) on (\S+) since ", holder(path))
    if m is None or m.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError):
        return False
    return True


class Heartbeat:
    """Whether the holder of the lock on the file `path` is alive, by its heartbeat (HolderLock's:
    the file's mtime refreshed every HEARTBEAT_S): asked again while waiting for the lock, True once
    the mtime has changed since the first asking, and from then on (`seen`; `seen_at`, when, on
    time.monotonic). Only a change seen counts, not the mtime's age against this host's clock: NFS
    clients' clocks differ, and a restart seconds after its node died finds the dead holder's last
    beat fresh. A lost node's lock, kept by the NFS server until its lease lapses, never beats."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.seen, self.seen_at = path, False, 0.0
        self._first = None  # (device, inode, mtime) first seen of the file under that name

    def __call__(self) -> bool:
        if self.seen:
            return True
        try:  # opened, not stat'ed: an NFS client checks an opened file's attributes with the server
            fd = os.open(self.path, os.O_RDONLY)  # (close-to-open), where a stat may answer from its cache
        except OSError:
            return False
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        now = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if self._first is None or self._first[:2] != now[:2]:  # a file made since: watched from here
            self._first = now
        elif now[2] != self._first[2]:
            self.seen, self.seen_at = True, time.monotonic()
        return self.seen


class HolderLock:
    """lock_for_life on the file `path` (created), which then names its holder (pid, host, when) for
    a process refused by it, and is removed and let go by release(), or let go (left in place) by this
    process's death. Processes this one forks (a checkpoint writer) do not hold it: a child outliving
    a killed parent for a moment would keep the lock from the restarted job it was there for.
    While held, a daemon thread refreshes the file's mtime every HEARTBEAT_S (a failed refresh is
    passed over), and a wait for a lock held so ends, refused, once the holder's heartbeat is seen:
    `live`, by default a Heartbeat of `path`. `wait_s`, `waiting`, `live`: lock_for_life's."""

    def __init__(self, path: str, busy: Busy, wait_s: float = 0.0, waiting: Callable[[], None] | None = None,
                 live: Callable[[], bool] | None = None):
        self.path, self.fd = path, None
        # unlocked: why no lock could be taken ("" once locked)
        self.fd, self.unlocked = claim(path, busy, wait_s=wait_s, waiting=waiting,
                                       live=Heartbeat(path) if live is None else live)
        os.register_at_fork(after_in_child=self._drop_in_child)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n".encode(), 0)
        # the beat and release() take turns on the descriptor: one closed and its number reused by
        # another open would have the beat touch an unrelated file
        self._turn, self._stop = threading.Lock(), threading.Event()
        threading.Thread(target=self._beat, name=f"heartbeat of {path}", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._turn:
                if self.fd is None:
                    return
                try:
                    os.utime(self.fd)
                except OSError:  # a file system refusing it for a moment: the next beat may land
                    pass

    def _drop_in_child(self) -> None:
        # the child's copy of the descriptor alone: a flock lasts while any copy of it is open, and
        # flock(LOCK_UN) here would let go of the parent's lock too
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is None:  # let go already, or a forked child's copy (whose _turn may have been held)
            return
        self._stop.set()
        with self._turn:
            try:
                os.unlink(self.path)
            except OSError:  # removed by hand: let go all the same
                pass
            os.close(self.fd)
            self.fd = None
