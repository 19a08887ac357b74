"""The records of a shard `polar data build` (polar/data_build.py) writes that repeat an earlier one
exactly (polar.records.record_digest: the same prompt, reference, candidates, labels and
wrapper): a sampler's output appended to itself, or a copy of an input under another name, would be
trained twice as often as the rest. They are kept, as every record is, and counted with the first few
named (the shard's metadata: counts.duplicates, duplicates_first; the build's summary line).

Each group's record id and digest (24 bytes) go to an unnamed temporary file beside the shard as its
chunk comes in (gone with the process however it ends): held in memory to the end of the build they
were 2.4 GB for a shard of 10^8 records, and as much again while sorting. At the end the rows are
split by their digests' bits into _FANOUT files, a file of more than _BLOCK rows split again by the
next bits, and each file of at most _BLOCK rows is sorted in memory alone: a record and its repeats
share their digest, so they land in one file, and the files' counts add up. Memory stays near
_BLOCK rows' worth whatever the shard's size; the disk holds the rows about twice (48 bytes a group).
Records of other shards are not compared (a machine of several sees only its own)."""
from __future__ import annotations

import heapq
import tempfile
from typing import Optional

import numpy as np

SHOWN = 3  # repeats named in the summary and the metadata

_ROW = np.dtype([("d0", np.uint64), ("d1", np.uint64), ("id", np.int64)])
_BLOCK = 1 << 20  # rows read, split or sorted at a time: 24 MiB, about 100 MiB at a sort's peak
_BITS = 6
_FANOUT = 1 << _BITS  # the files one split writes, open together
_PER_WORD = 64 // _BITS
_LEVELS = 2 * _PER_WORD  # splits by d0's bits, then d1's; rows still together after them share 120 bits


class Repeats:
    def __init__(self, directory: Optional[str] = None):
        """`directory`: where the rows are spilled, the shard's (a system /tmp may be small, or memory)."""
        self._dir = directory
        self._spill = None
        self._rows = 0

    def add(self, record_ids: np.ndarray, digests: np.ndarray) -> None:
        """One chunk's groups: their record ids (input order) and digests ([n, 2] uint64)."""
        if len(record_ids):
            rows = np.empty(len(record_ids), _ROW)
            rows["d0"], rows["d1"], rows["id"] = digests[:, 0], digests[:, 1], record_ids
            if self._spill is None:
                self._spill = _new_file(self._dir)
            _write(self._spill, rows)
            self._rows += len(rows)

    def find(self, sources: list[dict]) -> tuple[int, list[list[str]]]:
        """How many records repeat an earlier one, and [file:line, file:line of the first] for the first
        SHOWN of them (in input order). `sources`: the build's inputs, each {path, first_record}."""
        if self._spill is None:
            return 0, []
        spill, n, self._spill, self._rows = self._spill, self._rows, None, 0
        count, shown = _repeats(spill, n, 0, self._dir)
        starts = np.array([s["first_record"] for s in sources], dtype=np.int64)

        def where(rid: int) -> str:
            src = sources[int(np.searchsorted(starts, rid, side="right")) - 1]
            return f"{src['path']}:{rid - src['first_record'] + 1}"

        return count, [[where(rid), where(first)] for rid, first in shown]


def _new_file(directory: Optional[str]):
    # unbuffered: the rows go in and out in blocks, and up to _FANOUT files a level are open
    return tempfile.TemporaryFile(dir=directory, buffering=0)


def _write(f, rows: np.ndarray) -> None:
    data = memoryview(rows.view(np.uint8))
    while data:
        data = data[f.write(data):]


def _blocks(f, n: int):
    """The `n` rows of file `f`, _BLOCK at a time."""
    f.seek(0)
    for at in range(0, n, _BLOCK):
        rows = np.empty(min(_BLOCK, n - at), _ROW)
        view, got = memoryview(rows.view(np.uint8)), 0
        while got < len(view):
            k = f.readinto(view[got:])
            if not k:
                raise EOFError(f"a spill file of {n} rows ended in row {at + got // _ROW.itemsize}")
            got += k
        yield rows


def _repeats(f, n: int, level: int, directory: Optional[str]) -> tuple[int, list[tuple[int, int]]]:
    """The repeats among the `n` rows of `f` (in input order; closed here): how many, and (record id, the id of
    the record it repeats) for the SHOWN smallest ids."""
    parts = []
    try:
        if n <= _BLOCK or level >= _LEVELS:
            blocks = list(_blocks(f, n))
            return _sorted(blocks[0] if len(blocks) == 1 else np.concatenate(blocks))
        field = "d0" if level < _PER_WORD else "d1"
        shift = np.uint64(64 - _BITS * (level % _PER_WORD + 1))
        parts = [_new_file(directory) for _ in range(_FANOUT)]
        sizes = np.zeros(_FANOUT, np.int64)
        head, same = None, True
        for rows in _blocks(f, n):
            head = rows[0].copy() if head is None else head
            same = same and bool(((rows["d0"] == head["d0"]) & (rows["d1"] == head["d1"])).all())
            key = (rows[field] >> shift) & np.uint64(_FANOUT - 1)
            order = np.argsort(key, kind="stable")  # each part keeps the input order
            cut = np.searchsorted(key[order], np.arange(_FANOUT + 1, dtype=np.uint64))
            rows = rows[order]
            for k in np.flatnonzero(np.diff(cut)):
                _write(parts[k], rows[cut[k]:cut[k + 1]])
            sizes += np.diff(cut)
        f.close()  # before the parts are read: the disk holds the rows twice at most, during the split
        count, shown = 0, []
        if same:  # one record and its repeats: no split parts them
            (k,) = np.flatnonzero(sizes)
            return _one_digest(parts[k], n)
        for k in range(_FANOUT):
            if sizes[k]:
                c, s = _repeats(parts[k], int(sizes[k]), level + 1, directory)
                count, shown = count + c, heapq.nsmallest(SHOWN, shown + s)
        return count, shown
    finally:
        for p in [f, *parts]:
            p.close()


def _one_digest(f, n: int) -> tuple[int, list[tuple[int, int]]]:
    """_repeats of rows of one digest: the first in input order is the record the others repeat."""
    first, smallest = None, np.zeros(0, np.int64)
    for rows in _blocks(f, n):
        ids = rows["id"]
        if first is None:
            first, ids = int(ids[0]), ids[1:]
        smallest = np.sort(np.concatenate([smallest, ids]))[:SHOWN]
    return n - 1, [(int(i), first) for i in smallest]


def _sorted(rows: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    """_repeats of rows held in memory: one sort."""
    ids = rows["id"]
    order = np.lexsort((rows["d1"], rows["d0"]))  # stable: a digest's records stay in input order
    d0, d1, ids = rows["d0"][order], rows["d1"][order], ids[order]
    del order, rows
    first = np.ones(len(ids), dtype=bool)
    first[1:] = (d0[1:] != d0[:-1]) | (d1[1:] != d1[:-1])
    del d0, d1
    repeat = np.flatnonzero(~first)
    if not len(repeat):
        return 0, []
    # each repeat's first record: the last first-of-its-digest at or before it in sorted order
    original = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
    shown = repeat[np.argsort(ids[repeat], kind="stable")[:SHOWN]]
    return len(repeat), [(int(ids[i]), int(ids[original[i]])) for i in shown]


def first_of(shown, count: int) -> str:
    """The texts `shown` for the first of `count` things, joined by ', ', then ', ...' where some are not
    shown: how the build's summary and fine-tuning's messages name the first few records of a kind."""
    shown = list(shown)
    return ", ".join(shown) + (", ..." if count > len(shown) else "")


def named(count: int, first: list) -> str:
    """'a repeats b, c repeats d, ...' for the pairs (of `count` repeats) named, as the build's summary
    and fine-tuning's note (finetune_split.repeats_note) word them."""
    return first_of((f"{a} repeats {b}" for a, b in first), count)


def summary_line(count: int, first: list[list[str]], num_shards: int) -> str:
    """The build summary's line for `count` repeats ('' for none)."""
    if not count:
        return ""
    within = " of this shard (other shards' records are not compared)" if num_shards > 1 else ""
    return (f"\n  duplicates {count:,} records repeat an earlier record{within} exactly (the same prompt, "
            f"reference, candidates, labels and wrapper), kept: each is trained as often as it appears: "
            f"{named(count, first)}")
