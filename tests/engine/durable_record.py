"""Records, in order, the fsyncs and renames (os.replace) the code under test makes: real calls,
passed through to the file system, each logged once it succeeded with the real path of what it
touched. Used in tests, and by a script a test runs (a save needs its own process)."""
from __future__ import annotations

import os


def record(setattr_=setattr) -> list:
    """Wraps os.fsync and os.replace; returns the list they append to: ("fsync", path) and
    ("replace", source, target). `setattr_`: monkeypatch.setattr in a test (undone after it)."""
    calls: list = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        calls.append(("replace", os.path.realpath(src), os.path.realpath(dst)))

    setattr_(os, "fsync", fsync)
    setattr_(os, "replace", replace)
    return calls


def published_durably(calls: list, path) -> int:
    """Asserts that `path` was last written as a durable file is (engine.durable_file): a temporary
    file beside it fsynced, then renamed to `path`, then their directory fsynced. Returns the
    index of the rename in `calls`."""
    path = os.path.realpath(path)
    where = os.path.dirname(path)
    renames = [i for i, c in enumerate(calls) if c[0] == "replace" and c[2] == path]
    assert renames, f"{path} was not renamed into place: {calls}"
    i = renames[-1]
    tmp = calls[i][1]
    assert os.path.dirname(tmp) == where and tmp != path, calls[i]
    assert ("fsync", tmp) in calls[:i], f"{tmp} renamed to {path} before it was fsynced: {calls}"
    assert ("fsync", where) in calls[i + 1:], f"{where} not fsynced after {path} was renamed into it: {calls}"
    return i
