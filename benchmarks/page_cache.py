"""What of a file is in the page cache (Linux): the benchmarks that measure bytes read from storage
drop a file's pages, run, and count the pages that came back."""
import ctypes
import mmap
import os

import numpy as np


def drop(path: str) -> None:
    """Asks the kernel to drop `path`'s cached pages (posix_fadvise DONTNEED): honoured by ext4 and
    xfs for pages no process maps, ignored by tmpfs, so callers check with cached_bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: str) -> int:
    """Bytes of `path` in the page cache (mincore of a fresh mapping of it)."""
    size = os.path.getsize(path)
    if not size:
        return 0
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    m = np.memmap(path, dtype=np.uint8, mode="r")
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    if libc.mincore(ctypes.c_void_p(m.ctypes.data), ctypes.c_size_t(size), vec) != 0:
        raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
    del m
    return min(size, int((np.frombuffer(vec, np.uint8) & 1).sum()) * mmap.PAGESIZE)
