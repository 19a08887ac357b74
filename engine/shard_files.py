"""The open files of a dataset's shards: index maps and token files, at most N at once."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from engine.shard_format import DatasetFormatError


class TokenFile:
    """A shard's token file, open for positional reads (os.preadv) from any thread. Closed when the
    last holder lets go: FileMaps may drop it while a loader thread is reading from it, and an
    explicit close there could hand its descriptor number to another file mid-read."""

    def __init__(self, path: Path, opened: os.stat_result):
        self.path = path
        self._close = os.close  # held: at interpreter exit the module's globals may be gone first
        fd = os.open(path, os.O_RDONLY)
        try:
            check_unchanged(path, os.fstat(fd), opened)
        except BaseException:
            os.close(fd)
            raise
        # Set only now: a refused file's object is dropped when its error is (much later, if the error
        # is kept), and __del__ would close the number again, by then another file's.
        self.fd = fd

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            self._close(self.fd)

    def read_into(self, out: np.ndarray, offset: int) -> None:
        """Fills `out` (C-contiguous) with the bytes at `offset`: one system call, exactly these bytes."""
        view, got = memoryview(out).cast("B"), 0
        while got < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(self.fd, [view[got:]], offset + got)
            else:  # no preadv (macOS before 11): one copy more
                chunk = os.pread(self.fd, len(view) - got, offset + got)
                view[got:got + len(chunk)], n = chunk, len(chunk)
            if n == 0:
                raise DatasetFormatError(f"{self.path}: ends at byte {offset + got}, a read needs "
                                         f"{offset + len(view)} (truncated since it was opened?)")
            got += n


class FileMaps:
    """Read-only memory maps of shard indexes (.idx) and open token files (.bin), at most `size` at
    once, least recently used dropped first. Each holds a file descriptor (a map keeps a
    duplicate), so a dataset of hundreds of shards opened all at once runs into the open-file limit
    (1024 by default). Indexes are mapped, not read: every rank of a node shares one copy of a file
    in the page cache, where a private read would hold the whole index (tens of bytes a group) once
    per rank."""

    def __init__(self, size: int = 128):
        self.size = size
        self._maps: OrderedDict[Path, object] = OrderedDict()
        self._lock = threading.Lock()  # loaders may read from threads

    def _cached(self, path: Path):
        with self._lock:
            m = self._maps.get(path)
            if m is not None:
                self._maps.move_to_end(path)
            return m

    def _keep(self, path: Path, m) -> None:
        with self._lock:
            self._maps[path] = m
            # A dropped map (or file) stays valid for the arrays (or readers) already holding it;
            # its descriptor is released with the last of them.
            while len(self._maps) > self.size:
                self._maps.popitem(last=False)

    def get(self, path: Path, opened: os.stat_result, view=None):
        """The map of `path` (bytes; the file `opened` describes), or `view(map)` where given, kept with it."""
        m = self._cached(path)
        if m is not None:
            return m
        with open(path, "rb") as f:
            check_unchanged(path, os.fstat(f.fileno()), opened)
            m = np.memmap(f, dtype=np.uint8, mode="r")
        m = m if view is None else view(m)
        self._keep(path, m)
        return m

    def file(self, path: Path, opened: os.stat_result) -> TokenFile:
        """`path` (the file `opened` describes) open for positional reads."""
        f = self._cached(path)
        if f is None:
            f = TokenFile(path, opened)
            self._keep(path, f)
        return f


def check_unchanged(path: Path, now: os.stat_result, opened: os.stat_result) -> None:
    """DatasetFormatError unless `now` is the file `opened` was: what was checked at open (sizes,
    sequence offsets, counts) holds for that file only, and a shard rebuilt under an open dataset
    (another seed: files of the same sizes) would be read under the old counts and order."""
    if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (opened.st_dev, opened.st_ino, opened.st_size,
                                                                   opened.st_mtime_ns):
        raise DatasetFormatError(f"{path}: replaced or rewritten since the dataset was opened (now {now.st_size} "
                                 f"bytes, then {opened.st_size}); open the dataset again")
