"""The records of a shard `polar data build` (polar/data_build.py) writes that repeat an earlier one
exactly (polar.records.record_digest: the same prompt, reference, candidates, labels and
wrapper): a sampler's output appended to itself, or a copy of an input under another name, would be
trained twice as often as the rest. They are kept, as every record is, and counted with the first few
named (the shard's metadata: counts.duplicates, duplicates_first; the build's summary line).

The main process holds each group's record id and digest (24 bytes) to the end of the build, where
one sort finds the repeats: about 2.4 GB held for a shard of 10^8 records, and as much again while
sorting. Records of other shards are not compared (a machine of several sees only its own)."""
from __future__ import annotations

import numpy as np

SHOWN = 3  # repeats named in the summary and the metadata


class Repeats:
    def __init__(self):
        self._ids: list[np.ndarray] = []
        self._digests: list[np.ndarray] = []

    def add(self, record_ids: np.ndarray, digests: np.ndarray) -> None:
        """One chunk's groups: their record ids (input order) and digests ([n, 2] uint64)."""
        if len(record_ids):
            self._ids.append(record_ids)
            self._digests.append(digests)

    def find(self, sources: list[dict]) -> tuple[int, list[list[str]]]:
        """How many records repeat an earlier one, and [file:line, file:line of the first] for the first
        SHOWN of them (in input order). `sources`: the build's inputs, each {path, first_record}."""
        if not self._ids:
            return 0, []
        ids, d = np.concatenate(self._ids), np.concatenate(self._digests)
        self._ids, self._digests = [], []  # the chunks' arrays go: one copy held while sorting
        order = np.lexsort((d[:, 1], d[:, 0]))  # stable: a digest's records stay in input (id) order
        d, ids = d[order], ids[order]
        del order
        first = np.ones(len(ids), dtype=bool)
        first[1:] = (d[1:] != d[:-1]).any(axis=1)
        del d
        repeat = np.flatnonzero(~first)
        if not len(repeat):
            return 0, []
        # each repeat's first record: the last first-of-its-digest at or before it in sorted order
        original = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
        shown = repeat[np.argsort(ids[repeat], kind="stable")[:SHOWN]]
        starts = np.array([s["first_record"] for s in sources], dtype=np.int64)

        def where(rid: int) -> str:
            src = sources[int(np.searchsorted(starts, rid, side="right")) - 1]
            return f"{src['path']}:{rid - src['first_record'] + 1}"

        return len(repeat), [[where(int(ids[i])), where(int(ids[original[i]]))] for i in shown]


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
