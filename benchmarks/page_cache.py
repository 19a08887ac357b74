"""What of a file is in the page cache (Linux): the benchmarks that measure bytes read from storage
drop a file's pages, run, and count the pages that came back."""
import ctypes
import mmap
import os
import time

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


def cold_then_warm(makers: dict, path: str, order, used: int, first: str, used_is: str) -> None:
    """Prints a markdown table (first column `first`; `used_is` what `used` is, "the bytes used"),
    a row per reader: `makers` maps a name to a function making `read(j)`. For each
    in turn, `path`'s pages are dropped, the reader made, and the sequences of `order` read: the
    bytes of `path` that came into the page cache (against `used`, the bytes the reads need) and
    the time a read. Then the same reads with the pages cached, median of 7 passes, the readers'
    passes alternating (the machine's load drifts over seconds and would otherwise land on one).
    A reader holding a map keeps the pages it faulted in (DONTNEED skips mapped pages) while it
    lives, so a map-based reader goes after one that maps nothing."""
    print(f"| {first} | read into the page cache (MiB) | vs {used_is} | cold (ms a sequence) | warm (us a sequence) |")
    print("|---|---:|---:|---:|---:|", flush=True)
    size = os.path.getsize(path)
    readers, cells = {}, {}
    for name, make in makers.items():
        drop(path)
        before = cached_bytes(path)
        read = readers[name] = make()
        if before > 0.01 * size:
            cells[name] = (f"(the page cache kept {before / 2**20:.0f} MiB of the file after DONTNEED: this "
                           "file system cannot be measured) | |")
            continue
        t = time.perf_counter()
        for j in order:
            read(int(j))
        dt = time.perf_counter() - t
        got = cached_bytes(path) - before
        cells[name] = f"{got / 2**20:.2f} | {got / used:.2f}x | {1e3 * dt / len(order):.3f}"
    warm = {name: [] for name in readers}
    for _ in range(7):
        for name, read in readers.items():
            t = time.perf_counter()
            for j in order:
                read(int(j))
            warm[name].append((time.perf_counter() - t) / len(order))
    for name, c in cells.items():
        print(f"| {name} | {c} | {1e6 * float(np.median(warm[name])):.0f} |", flush=True)
