"""Output into a pipe whose reader has gone (`engine/pretrain.py --print-config | head -1`, a training
run's `| tee log` whose tee ended with the login that started it).

Python ignores SIGPIPE, so a write into such a pipe raises BrokenPipeError; caught, the program
still fails again when the interpreter flushes stdout at exit, with a traceback about the flush.
"""
from __future__ import annotations

import errno
import os
import sys


def reader_gone() -> int:
    """Called where a command caught BrokenPipeError: points stdout at /dev/null, so the flush at exit
    has nowhere to fail, and returns exit code 1 (the reader left before the output was written: the
    command did not finish what it was asked). Where stdout's reader is still there the error came from
    another pipe (a background checkpoint writer's queue, a socket), and it is raised again with its
    traceback: taken for stdout's, a run ended with status 1 and not a word."""
    if not _stdout_reader_gone():
        raise  # the BrokenPipeError the caller is handling
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, sys.stdout.fileno())
    finally:
        os.close(null)
    return 1


def _stdout_reader_gone() -> bool:
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        # no stdout (closed at start: None) or none on a file descriptor (a StringIO): no pipe of its
        # own to have lost a reader, so the error is another's
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


# EPIPE: the pipe's reader ended; EIO: the terminal the run was started on went away (a disowned run
# whose output was left on the closed terminal); ENOSPC, EDQUOT: the log file's disk or quota is full
# (a job's log in a home directory, its checkpoints on a scratch file system)
_LOST = (errno.EPIPE, errno.EIO, errno.ENOSPC, errno.EDQUOT)


class _OutputThatOutlivesItsReader:
    """sys.stdout or sys.stderr of a long run: the first write or flush that finds its reader gone (or
    its file's disk full) points the stream's file descriptor at /dev/null, and the run goes on. Its
    progress lines are lost from then on; the run's product (checkpoints, summary.json, scored rows) is
    written to files. That is said once on the other stream, where it still has somewhere to go: a log
    file that stops mid-run on a full disk or quota is otherwise read as a run that hung."""

    def __init__(self, stream, name: str):
        self._stream, self._name, self._gone = stream, name, False

    def _lost(self, e: OSError) -> bool:
        if e.errno not in _LOST:
            return False
        fd = self._stream.fileno()
        try:
            where = f" ({os.readlink(f'/proc/self/fd/{fd}')})"  # the log file's path, or pipe:[inode]
        except OSError:
            where = ""
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
        if not self._gone:
            self._gone = True
            other = sys.stderr if self._name == "stdout" else sys.stdout
            try:  # the other stream's own loss (the same full disk) is taken by its wrapper
                print(f"note: {self._name}{where} failed ({e.strerror}): the run goes on, its {self._name} from "
                      "here into /dev/null", file=other, flush=True)
            except (AttributeError, OSError, ValueError):  # no other stream, or one not ours that failed too
                pass
        return True

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            if not self._lost(e):
                raise
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            if not self._lost(e):
                raise
            self._stream.flush()  # what was buffered goes to /dev/null: a later flush has nothing left to fail on

    def __getattr__(self, name):
        return getattr(self._stream, name)


def outlive_lost_readers() -> None:
    """A run's output outlives its readers: stdout and stderr that lose theirs go on into /dev/null
    (without this, the next progress line raised BrokenPipeError and ended a run of days for a side
    concern), and a stream closed when the process started (`>&-`: Python makes it None, and a
    `sys.stdout.flush()` raised AttributeError) writes into /dev/null too. Called once the process
    groups start (engine.runtime.init_runtime), after the command-line output that ends the command
    when its reader goes (reader_gone). Idempotent. A stream some host program put in place of the
    process's own (pytest's capture, a notebook's) is left alone: that program owns it, may close it
    and put another in its place, and a wrapper kept past that wrote into a closed file."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not getattr(sys, f"__{name}__"):
            continue
        if stream is None:
            stream = open(_devnull_on(1 if name == "stdout" else 2), "w", closefd=False)
        if not isinstance(stream, _OutputThatOutlivesItsReader):
            setattr(sys, name, _OutputThatOutlivesItsReader(stream, name))


def _devnull_on(fd: int) -> int:
    """/dev/null on a standard descriptor closed at the start, for this process's writes and its
    children's: left closed, the next file opened takes the number (open() gives the lowest free),
    and a child (a spawned worker, a compiler run) inherits that file as its stdout, or nothing."""
    try:
        os.fstat(fd)
    except OSError:  # closed: /dev/null takes its place
        null = os.open(os.devnull, os.O_WRONLY)
        if null != fd:
            os.dup2(null, fd)  # inheritable, as dup2 makes it
            os.close(null)
        else:
            os.set_inheritable(fd, True)
        return fd
    # already taken by a file opened since (the number is its now): writes go to a /dev/null of their own
    return os.open(os.devnull, os.O_WRONLY)
