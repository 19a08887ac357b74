"""The open files of a dataset's shards, read with positional reads of exactly the bytes wanted;
at most N open at once, least recently used closed first."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from engine.shard_format import DatasetFormatError


class ShardFile:
    """One file of a shard (.idx or .bin), open for positional reads (os.preadv) from any thread.
    Closed when the last holder lets go: OpenFiles may drop it while a loader thread is reading
    from it, and an explicit close there could hand its descriptor number to another file mid-read."""

    def __init__(self, path: Path, opened: os.stat_result, fd: int | None = None):
        """`fd`: `path` opened already, `opened` its fstat (given over: closed by this object)."""
        self.path = path
        self._close = os.close  # held: at interpreter exit the module's globals may be gone first
        given = fd is not None
        try:
            fd = fd if given else os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a --force rebuild removes the old .idx first, then puts the new shard in place
            raise removed_since_opened(path) from None
        try:  # until self.fd is set, nothing else closes fd
            if not given:
                check_unchanged(path, os.fstat(fd), opened)
            if hasattr(os, "posix_fadvise"):
                # Reads land anywhere (a shuffled epoch): no read-ahead around them, which the kernel
                # still does for some small reads it takes for sequential (2.45x the pages used, here).
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
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


def default_size() -> int:
    """A quarter of the process's open-file limit (the rest is the run's: sockets, logs, torch's
    shared memory), at least 16: 256 files (128 shards) under the common default of 1024."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft // 4)


class OpenFiles:
    """The shard files a dataset has open, at most `size` at once (default_size()), least recently
    used dropped first: a dataset of thousands of shards opened whole runs into the open-file limit.
    A file holds only a descriptor (no map, no buffer), so the bound follows the limit.

    Nothing is mapped: a page fault on a map reads around the page (the device's read-ahead, 128 KB
    to MBs) where a positional read brings in only what it asks, and on data larger than the page
    cache that is many times the bytes used (benchmarks/dataset_cold_read.py). The ranks of a node
    still share one copy of what they read, in the page cache."""

    def __init__(self, size: int | None = None):
        self.size = default_size() if size is None else size
        self._files: OrderedDict[Path, ShardFile] = OrderedDict()
        self._lock = threading.Lock()  # loaders may read from threads

    def get(self, path: Path, opened: os.stat_result) -> ShardFile:
        """`path` (the file `opened` describes) open for positional reads."""
        with self._lock:
            f = self._files.get(path)
            if f is not None:
                self._files.move_to_end(path)
                return f
        return self._keep(path, ShardFile(path, opened))

    def _keep(self, path: Path, f: ShardFile) -> ShardFile:
        with self._lock:
            self._files[path] = f
            self._files.move_to_end(path)
            # a dropped file stays open for the readers holding it, and closes with the last of them
            while len(self._files) > self.size:
                self._files.popitem(last=False)
        return f

    def adopt(self, path: Path, fd: int, opened: os.stat_result) -> None:
        """The file `path` that the caller has opened (`fd`, given over; `opened` its fstat, which later
        opens are checked against: check_unchanged), kept as its open file: a shard's index is read at
        open (header, offsets, counts) by every rank, and opening it a second time for the reads was
        one more metadata request per shard and rank on a shared file system."""
        self._keep(path, ShardFile(path, opened, fd))  # ShardFile closes fd where it fails

    def read(self, path: Path, opened: os.stat_result, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        """`count` elements of `dtype` at byte `offset` of `path`, in a new array."""
        out = np.empty(count, dtype)
        if count:
            self.get(path, opened).read_into(out, offset)
        return out


def removed_since_opened(path: Path) -> DatasetFormatError:
    return DatasetFormatError(f"{path}: removed since the dataset was opened (a rebuild putting its shard in place?); "
                              "open the dataset again")


def check_unchanged(path: Path, now: os.stat_result, opened: os.stat_result) -> None:
    """DatasetFormatError unless `now` is the file `opened` was: what was checked at open (sizes,
    sequence offsets, counts) holds for that file only, and a shard rebuilt under an open dataset
    (another seed: files of the same sizes) would be read under the old counts and order."""
    if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (opened.st_dev, opened.st_ino, opened.st_size,
                                                                   opened.st_mtime_ns):
        raise DatasetFormatError(f"{path}: replaced or rewritten since the dataset was opened (now {now.st_size} "
                                 f"bytes, then {opened.st_size}); open the dataset again")
