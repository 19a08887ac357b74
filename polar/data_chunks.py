"""Which lines of `polar data build`'s inputs each shard builds, found without holding every line.

The input lines (files in the order given) are cut into chunks of --chunk-records lines, and the
chunks over all inputs into --num-shards contiguous runs; shard i builds run i. Each machine counts
the lines of every input (the runs, the record ids and the build id depend on them) without keeping
where they start, or takes the counts of a `polar data scan` made once for all machines
(polar/data_scan.py), then reads again only the blocks where its own chunks begin: it holds one byte
offset per chunk of its own, none per line, whatever the inputs' size. An input that changes under
the build (cut short, rewritten) is InputChanged, found by a count that does not match.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

# Bytes read at a time; one int64 (the newlines before it) is kept per block of every input: 2 MB for
# 1 TB of JSONL, whatever its lines. A shard reads again one block for each of its chunks' first lines.
_SCAN_BLOCK = 1 << 22
# Newline positions are listed this many bytes at a time: at most 8 bytes each, a piece of "\n"s.
_FIND_PIECE = 1 << 20
CHANGED = ("cut short or rewritten during the build; nothing of the shard was written: run again once it is "
            "complete")


@dataclass
class Chunk:
    index: int
    file: str
    start: int  # byte range [start, end) of whole lines
    end: int
    first_line: int  # 1-based line number of the first line in its file
    first_record: int  # 0-based line number over all inputs: the record id kept in the index
    # what the count of the file found in [start, end): its lines, and its "\n"s (one fewer where
    # the file's last line has none), which the bytes read for the chunk must hold again
    lines: int
    newlines: int


class InputChanged(ValueError):
    """An input read shorter than the build's scan of it found it, or holding other lines."""


@dataclass
class LineCount:
    """The lines of an input's first `size` bytes, counted without keeping where each one starts:
    newlines[j] is the number of "\\n" before block j (blocks of `block` bytes; the last entry is
    the file's), one int64 per block whatever the lines' count, from which the start of any line
    is found again by reading the one block that holds it (find_line_starts)."""
    path: str
    size: int
    lines: int
    newlines: np.ndarray
    block: int

    def blocks_holding(self, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the lines (ascending) but line 0: their positions in `lines`, the newline each starts
        after (0-based over the file) and the block that holds it."""
        todo = np.flatnonzero(lines > 0)
        ends = lines[todo] - 1
        return todo, ends, np.searchsorted(self.newlines, ends, side="right") - 1

    def block_bytes(self, lines: np.ndarray) -> int:
        """The bytes find_line_starts reads to find these lines."""
        blocks = np.unique(self.blocks_holding(lines)[2])
        return int(np.minimum(self.block, self.size - blocks * self.block).sum())


def count_blocks(path: str, size: int, first: int = 0, stop: int | None = None, block: int = 0, on_block=None,
                 began: str = "the build began counting its lines", changed: str = CHANGED) -> tuple[np.ndarray, int]:
    """The "\\n"s in each of blocks [first, stop) (default: to the end) of the file's first `size`
    bytes, read a block at a time, and the last byte read (10 when none); `on_block(nbytes)` after
    each block. A file now shorter than those blocks is InputChanged, saying when it had `size`
    bytes and what `changed` means for what was being made."""
    block = block or _SCAN_BLOCK
    stop = -(-size // block) if stop is None else stop
    offset, end = first * block, min(stop * block, size)
    counts, last = np.zeros(max(stop - first, 0), dtype=np.int64), 10
    buf = memoryview(bytearray(min(block, max(end - offset, 0))))
    with open(path, "rb") as f:
        f.seek(offset)
        # one readinto a block: a buffered file fills it unless the file ends first
        for j in range(len(counts)):
            want = min(block, end - offset)
            got = f.readinto(buf[:want])
            if got < want:
                raise InputChanged(f"{path}: {os.path.getsize(path)} bytes, fewer than the {size} it had when "
                                   f"{began}: {changed}")
            data = np.frombuffer(buf, dtype=np.uint8, count=got)
            counts[j], last, offset = np.count_nonzero(data == 10), int(data[-1]), offset + got
            if on_block:
                on_block(got)
    return counts, last


def count_lines(path: str, on_block=None, size: int | None = None) -> LineCount:
    """The lines of the first `size` bytes of a file (default: its size now; a last line without
    "\\n" counts), read in blocks; `on_block(nbytes)` after each block (progress). Bytes appended
    during the scan (a sampler still writing the input) are not read; a file cut short is
    InputChanged."""
    size = os.path.getsize(path) if size is None else size
    counts, last = count_blocks(path, size, on_block=on_block)
    return line_count(path, size, counts, last, _SCAN_BLOCK)


def line_count(path: str, size: int, counts: np.ndarray, last: int, block: int) -> LineCount:
    """The LineCount of a file of `size` bytes from the "\\n"s of each of its blocks and its last byte."""
    newlines = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=newlines[1:])
    return LineCount(path, size, int(newlines[-1]) + (size > 0 and last != 10), newlines, block)


def find_line_starts(count: LineCount, lines: np.ndarray, on_block=None) -> np.ndarray:
    """Byte offsets where the given lines (0-based, ascending, each < count.lines) start. Only the
    blocks holding the newline before one of them are read, each checked to hold as many newlines
    as when counted (InputChanged otherwise); the newlines' positions are listed a piece at a
    time, so that memory stays that of the answer and one block, however many lines a block holds."""
    lines = np.asarray(lines, dtype=np.int64)
    out = np.zeros(len(lines), dtype=np.int64)  # line 0 starts at byte 0
    todo, ends, blocks = count.blocks_holding(lines)
    edges = np.flatnonzero(np.diff(blocks, prepend=-1, append=len(count.newlines))) if len(todo) else []
    buf = memoryview(bytearray(min(count.block, count.size)))
    with open(count.path, "rb") as f:
        for a, b in zip(edges[:-1], edges[1:]):  # the wanted lines whose newline block j holds
            j = int(blocks[a])
            start, before = j * count.block, int(count.newlines[j])
            f.seek(start)
            got = f.readinto(buf[:min(count.block, count.size - start)])
            data = np.frombuffer(buf, dtype=np.uint8, count=got)
            want, seen = ends[a:b] - before, 0
            for p in range(0, got, _FIND_PIECE):
                at = np.flatnonzero(data[p:p + _FIND_PIECE] == 10)
                here = (want >= seen) & (want < seen + len(at))
                out[todo[a:b][here]] = start + p + at[want[here] - seen] + 1
                seen += len(at)
            if got < min(count.block, count.size - start) or seen != count.newlines[j + 1] - before:
                raise InputChanged(f"{count.path}: its bytes {start}-{start + got} hold {seen} line ends where the "
                                   f"build counted {count.newlines[j + 1] - before}: {CHANGED}")
            if on_block:
                on_block(got)
    return out


def amount_of(done: int, total: int) -> str:
    """"0.80 of 1.60 MB": both in the unit that suits `total` (decimal, as the rates' MB/s); in GB
    always, a scan of a few MB read "0.00 of 0.00 GB"."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if total >= scale:
            return f"{done / scale:.2f} of {total / scale:.2f} {unit}"
    return f"{done:,} of {total:,} bytes"


class ScanProgress:
    """Every shard's build counts the lines of all inputs first (at ~1 GB/s, minutes for a large
    corpus; a scan does it once for all), then finds where its own chunks start: said every
    `interval` seconds, with rate and ETA, on stderr."""

    def __init__(self, total: int, quiet: bool, interval: float = 2.0, what: str = "scanning inputs for lines"):
        self.total, self.quiet, self.interval, self.what = total, quiet, interval, what
        self.done, self.start = 0, time.time()
        self.last = self.start

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.time()
        if self.quiet or now - self.last < self.interval:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        print(f"  {self.what}: {amount_of(self.done, self.total)} "
              f"({self.done / max(self.total, 1):.0%}) | {rate / 1e6:,.0f} MB/s | ETA "
              f"{(self.total - self.done) / max(rate, 1):.0f}s", file=sys.stderr, flush=True)


@dataclass
class _Span:
    """The chunks of one input that fall to this shard: chunk k (from 0) holds the lines from
    first_line + k * chunk_records, between bytes bounds[k] and bounds[k + 1]."""
    path: str
    first_chunk: int  # index over all inputs' chunks
    first_line: int  # 0-based in the file
    first_record: int  # the file's first line's record id
    chunk_records: int
    bounds: np.ndarray
    lines: int  # the file's, and its "\n"s
    newlines: int

    def chunk(self, k: int) -> Chunk:
        a = self.first_line + k * self.chunk_records
        b = min(a + self.chunk_records, self.lines)
        return Chunk(self.first_chunk + k, self.path, int(self.bounds[k]), int(self.bounds[k + 1]), a + 1,
                     self.first_record + a, b - a, min(b, self.newlines) - a)


class ShardChunks:
    """One shard's chunks, made when iterated from their byte bounds: one int64 held per chunk of
    the shard (and one per input it reaches into), none for the lines of the other shards' chunks
    or inside a chunk; a machine of N building one file of 10^9 lines holds 10^9 / chunk_records / N."""

    def __init__(self, spans: list[_Span], first: int, stop: int):
        self.spans, self.first, self.stop = spans, first, stop

    def __len__(self) -> int:
        return self.stop - self.first

    def __iter__(self):
        for span in self.spans:
            for k in range(len(span.bounds) - 1):
                yield span.chunk(k)

    @property
    def bytes(self) -> int:
        return sum(int(s.bounds[-1] - s.bounds[0]) for s in self.spans)

    @property
    def offsets_held(self) -> int:
        return sum(len(s.bounds) for s in self.spans)


def plan_chunks(files: list[str], chunk_records: int, quiet: bool = True, num_shards: int = 1,
                shard_index: int = 0, counts: list[LineCount] | None = None) -> tuple[ShardChunks, list[dict]]:
    """Shard `shard_index` of `num_shards`'s chunks, and every input's sources entry. The rule is the
    module's: each file's lines cut into chunks of chunk_records, the chunks over all inputs split into
    num_shards contiguous runs. The runs depend on every input's line count (the record ids and build
    id on the lines before): each machine counts them all, unless given them (`counts`, one per file:
    a `polar data scan`, polar/data_scan.py), then reads only the blocks where its own chunks start."""
    if counts is None:
        progress = ScanProgress(sum(os.path.getsize(p) for p in files), quiet)
        # One size for the scan, the chunks and the sources: an input still being appended to had its
        # new lines read into the last chunk but not counted in its lines, and their record ids were
        # those of the next file's first records.
        counts = [count_lines(path, progress, os.path.getsize(path)) for path in files]
    sources, base = [], 0
    for path, count in zip(files, counts):
        sources.append({"path": str(path), "bytes": count.size, "lines": count.lines, "first_record": base})
        base += count.lines
    per_file = [-(-c.lines // chunk_records) for c in counts]
    total = sum(per_file)
    first, stop = shard_index * total // num_shards, (shard_index + 1) * total // num_shards
    spans, wanted, offset = [], [], 0
    for count, src, n in zip(counts, sources, per_file):
        a, b = max(first - offset, 0), min(stop - offset, n)  # this file's chunks of the shard
        if a < b:
            lines = np.arange(a, b + 1, dtype=np.int64) * chunk_records
            spans.append(_Span(count.path, offset + a, a * chunk_records, src["first_record"], chunk_records,
                               np.full(len(lines), count.size, dtype=np.int64), count.lines,
                               int(count.newlines[-1])))
            wanted.append((count, lines[lines < count.lines]))
        offset += n
    find = ScanProgress(sum(c.block_bytes(w) for c, w in wanted), quiet, what="finding this shard's chunks")
    for span, (count, lines) in zip(spans, wanted):
        span.bounds[:len(lines)] = find_line_starts(count, lines, find)
    return ShardChunks(spans, first, stop), sources
