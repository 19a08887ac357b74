"""Packed groups on disk: a writer for dataset builders and a reader for training (indexes
memory-mapped, tokens read a packed sequence at a time).

A dataset is a directory of shards, read as their concatenation in file-name order. A shard is

    NAME.bin    the token ids of every piece (a group's prefix, then its candidates), back to back,
                in the dtype the index names (uint16 when the vocabulary fits, else int32)
    NAME.idx    header + index arrays (below); written last, so its presence marks a complete shard
    NAME.json   the builder's metadata (tokenizer, special ids, counts, sources ...), free-form
                except for the keys this module writes: seq_length, vocab_size, pad_id, token_dtype,
                and `build` (below), which it reads

    .idx = magic b"PLRIDX\\0\\0", uint32 version, uint32 K, char[8] token dtype (numpy str, padded),
           uint64 seq_length, S sequences, G groups, P pieces, T tokens, then (little-endian):
           int64 seq_groups[S+1]    groups of sequence s: seq_groups[s] .. seq_groups[s+1]
           int64 group_pieces[G+1]  pieces of group g; the first is its prefix, the rest candidates
                                    (non-empty, a positive and a negative among them)
           int64 piece_tokens[P+1]  tokens of piece p in .bin: piece_tokens[p] .. piece_tokens[p+1]
           int64 group_source[G]    the builder's id of the record a group came from (-1 = none)
           int8  piece_label[P]     -1 on a prefix, else the candidate's label (1 positive, 0 negative)
           (version 2: zero padding to a multiple of 8 bytes, then)
           int64 counts[K][S]       per sequence, what training needs before it reads a sequence
                                    (COUNTS: tokens, groups, pairs, ...; engine.data.per_group_counts
                                    summed over the sequence's groups); K = 0 in version 1

Opening a version-2 shard reads O(sequences) of its index (seq_groups and counts), not O(groups):
at 10^9 groups every rank of every node would otherwise read and check the whole index (tens of
GB) before the first step. What a rank reads of a sequence is checked as it is read (offsets,
labels, and its counts recomputed), so a damaged index still stops the run with the file and
sequence named instead of training on garbage; `IndexedDataset.verify()` (`polar data stats`,
`engine/pretrain.py --check-config`) checks every sequence at once. Version 1 (no counts) is read,
checked and counted whole at open.

Concatenating datasets is copying their shard files into one directory under names that sort in
the wanted order (e.g. `a-part-00000-of-00002.*`, `b-part-...`); all shards must agree on
seq_length, vocab_size, pad_id, bos_id and tokenizer. This module knows token ids and groups only,
no text format.

A builder that splits one dataset over N shards (machines) names the build set in each shard's
metadata: `build = {"id": str, "shard_index": i, "num_shards": N, "inputs": str}` (`inputs`
identifies the records read). A directory must hold every shard of each build set exactly once,
and no two build sets of the same inputs: a missing shard would silently lose its records, and a
leftover of an earlier build (another --num-shards, say) would read them twice. Shards without
`build` (other writers) are not checked.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from engine.data import per_group_counts
from engine.packing import Group

MAGIC = b"PLRIDX\0\0"
VERSION = 2  # the version ShardWriter writes; the reader also reads 1
# The per-sequence count columns of a version-2 index, in file order: engine.data.per_group_counts'
# keys (another set or order is another version).
COUNTS = ("tokens", "groups", "pairs", "positives", "lm_targets", "attention_pairs")
_HEADER = struct.Struct("<8sII8sQQQQQ")


class DatasetFormatError(ValueError):
    """A shard that cannot be read as written by ShardWriter; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class ShardWriter:
    """Appends packed sequences to one shard; `close()` makes it visible to readers.

    Tokens stream to disk as they come; the index (a few int64 per group and piece) stays in
    memory until close. Files are written under `.tmp` names and renamed at close, so a build
    killed midway leaves no shard a reader would mistake for complete.
    """

    def __init__(self, path: str | os.PathLike, seq_length: int, vocab_size: int, pad_id: int, meta: dict | None = None):
        self.path = Path(path)
        self.seq_length = int(seq_length)
        self.vocab_size = int(vocab_size)
        self.pad_id = int(pad_id)
        self.meta = dict(meta or {})
        self.dtype = token_dtype(self.vocab_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self.path.with_name(self.path.name + ".bin.tmp")
        self._bin = open(self._tmp_bin, "wb")
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                                    ("seq_groups", "group_pieces", "piece_lengths", "piece_labels", "sources")}
        self._tokens = 0
        self._sequences = 0
        self._closed = False

    def add_sequence(self, groups: list[Group], sources: list[int] | None = None) -> None:
        """One packed sequence: whole groups whose lengths sum to at most seq_length."""
        if not groups:
            raise ValueError("a packed sequence needs at least one group")
        pieces = [p for g in groups for p in (g.prefix, *g.candidates)]
        self.add_sequences(
            tokens=np.concatenate(pieces),
            piece_lengths=np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces)),
            piece_labels=np.concatenate([np.concatenate([[-1], g.labels]) for g in groups]),
            group_pieces=np.array([1 + len(g.candidates) for g in groups]),
            seq_groups=np.array([len(groups)]),
            sources=sources,
        )

    def add_sequences(self, tokens, piece_lengths, piece_labels, group_pieces, seq_groups, sources=None) -> None:
        """Many packed sequences as flat arrays (what a build worker sends, no Group objects):
        tokens of every piece back to back; per piece its length and label (-1 on a prefix);
        per group its piece count; per sequence its group count; per group an optional source id."""
        tokens = np.asarray(tokens)
        piece_lengths, group_pieces, seq_groups = (np.asarray(a, dtype=np.int64) for a in
                                                   (piece_lengths, group_pieces, seq_groups))
        piece_labels = np.asarray(piece_labels, dtype=np.int8)
        for what, total, n in (("piece lengths", piece_lengths.sum(), tokens.size),
                               ("group piece counts", group_pieces.sum(), piece_lengths.size),
                               ("sequence group counts", seq_groups.sum(), group_pieces.size),
                               ("piece labels", piece_labels.size, piece_lengths.size)):
            if total != n:
                raise ValueError(f"{what} add up to {total}, expected {n}")
        if (seq_groups < 1).any() or (group_pieces < 3).any():
            raise ValueError("every sequence needs a group, and every group a prefix and at least 2 candidates")
        starts = np.zeros(group_pieces.size + 1, dtype=np.int64)
        np.cumsum(group_pieces, out=starts[1:])
        is_prefix = np.zeros(piece_lengths.size, dtype=bool)
        is_prefix[starts[:-1]] = True
        if (is_prefix != (piece_labels == -1)).any() or not np.isin(piece_labels[~is_prefix], (0, 1)).all():
            raise ValueError("piece labels must be -1 on each group's first piece (its prefix) and 0/1 on candidates")
        problem = _groups_problem(group_pieces - 1, _segment_sums((piece_labels == 1).astype(np.int64), starts),
                                  piece_lengths[~is_prefix])
        if problem:
            raise ValueError(f"{problem}: engine.packing.Group refuses it")
        group_tokens = _segment_sums(piece_lengths, starts)
        seq_starts = np.zeros(seq_groups.size + 1, dtype=np.int64)
        np.cumsum(seq_groups, out=seq_starts[1:])
        seq_tokens = _segment_sums(group_tokens, seq_starts)
        if seq_tokens.size and seq_tokens.max() > self.seq_length:
            raise ValueError(f"a sequence of {seq_tokens.max()} tokens does not fit seq_length={self.seq_length}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        sources = np.full(group_pieces.size, -1, np.int64) if sources is None else np.asarray(sources, dtype=np.int64)
        if sources.shape != group_pieces.shape:
            raise ValueError(f"{sources.size} sources for {group_pieces.size} groups")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._tokens += tokens.size
        self._sequences += seq_groups.size
        for k, v in (("seq_groups", seq_groups), ("group_pieces", group_pieces), ("piece_lengths", piece_lengths),
                     ("piece_labels", piece_labels), ("sources", sources)):
            self._parts[k].append(v)

    @property
    def num_sequences(self) -> int:
        return self._sequences

    def close(self) -> dict:
        """Write the index and metadata, rename into place; returns the metadata written."""
        if self._closed:
            raise ValueError(f"{self.path}: shard already closed")
        self._closed = True
        self._bin.close()
        parts = {k: np.concatenate(v) if v else np.zeros(0, np.int8 if k == "piece_labels" else np.int64)
                 for k, v in self._parts.items()}

        def offsets(counts):
            out = np.zeros(counts.size + 1, dtype=np.int64)
            np.cumsum(counts, out=out[1:])
            return out

        arrays = [offsets(parts["seq_groups"]), offsets(parts["group_pieces"]), offsets(parts["piece_lengths"]),
                  parts["sources"], parts["piece_labels"]]
        S, G, P = self.num_sequences, parts["group_pieces"].size, parts["piece_lengths"].size
        counts = _sequence_counts(_Index(*arrays, counts=None))
        header = _HEADER.pack(MAGIC, VERSION, len(COUNTS), self.dtype.str.encode().ljust(8, b"\0"),
                              self.seq_length, S, G, P, self._tokens)
        meta = {**self.meta, "seq_length": self.seq_length, "vocab_size": self.vocab_size,
                "pad_id": self.pad_id, "token_dtype": self.dtype.name,
                "shard": {"sequences": S, "groups": G, "pieces": P, "tokens": self._tokens}}
        tmp_idx = self.path.with_name(self.path.name + ".idx.tmp")
        with open(tmp_idx, "wb") as f:
            f.write(header)
            for a in arrays:
                f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
            f.write(b"\0" * (-f.tell() % 8))
            for k in COUNTS:
                f.write(counts[k].astype("<i8", copy=False).tobytes())
        self.path.with_name(self.path.name + ".json").write_text(json.dumps(meta, indent=1))
        os.replace(self._tmp_bin, self.path.with_name(self.path.name + ".bin"))
        os.replace(tmp_idx, self.path.with_name(self.path.name + ".idx"))  # last: the shard is complete
        return meta

    def abort(self) -> None:
        """Drop everything written so far (a failed build leaves nothing behind)."""
        self._closed = True
        self._bin.close()
        for p in (self._tmp_bin, self.path.with_name(self.path.name + ".idx.tmp")):
            p.unlink(missing_ok=True)


class _TokenFile:
    """A shard's token file, open for positional reads (os.preadv) from any thread. Closed when the
    last holder lets go: _FileMaps may drop it while a loader thread is reading from it, and an
    explicit close there could hand its descriptor number to another file mid-read."""

    def __init__(self, path: Path, opened: os.stat_result):
        self.path = path
        self._close = os.close  # held: at interpreter exit the module's globals may be gone first
        fd = os.open(path, os.O_RDONLY)
        try:
            _check_unchanged(path, os.fstat(fd), opened)
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


class _FileMaps:
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
            _check_unchanged(path, os.fstat(f.fileno()), opened)
            m = np.memmap(f, dtype=np.uint8, mode="r")
        m = m if view is None else view(m)
        self._keep(path, m)
        return m

    def file(self, path: Path, opened: os.stat_result) -> _TokenFile:
        """`path` (the file `opened` describes) open for positional reads."""
        f = self._cached(path)
        if f is None:
            f = _TokenFile(path, opened)
            self._keep(path, f)
        return f


def _check_unchanged(path: Path, now: os.stat_result, opened: os.stat_result) -> None:
    """DatasetFormatError unless `now` is the file `opened` was: what was checked at open (sizes,
    sequence offsets, counts) holds for that file only, and a shard rebuilt under an open dataset
    (another seed: files of the same sizes) would be read under the old counts and order."""
    if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (opened.st_dev, opened.st_ino, opened.st_size,
                                                                   opened.st_mtime_ns):
        raise DatasetFormatError(f"{path}: replaced or rewritten since the dataset was opened (now {now.st_size} "
                                 f"bytes, then {opened.st_size}); open the dataset again")


def _groups_problem(n_cand: np.ndarray, n_pos: np.ndarray, cand_lengths: np.ndarray) -> str | None:
    """What engine.packing.Group would refuse of groups of n_cand candidates, n_pos of them positive
    (`cand_lengths`: their candidates' lengths), or None. Read, such a group would stop a run with
    Group's error, which names neither the shard nor the sequence."""
    if (n_pos < 1).any() or (n_pos >= n_cand).any() or (cand_lengths < 1).any():
        return "a group without a positive and a negative candidate, or with an empty candidate"
    return None


class _Index(NamedTuple):
    """A shard's index arrays (views of its mapped .idx; see the module docstring)."""
    seq_groups: np.ndarray
    group_pieces: np.ndarray
    piece_tokens: np.ndarray
    group_source: np.ndarray
    piece_label: np.ndarray
    counts: np.ndarray | None  # [len(COUNTS), S] (version 2), None (version 1)


def _check_offsets(ix: _Index, tokens: int) -> str | None:
    """What is wrong with the offsets and labels of `ix` (whose last piece ends at `tokens`), or None.
    Sequences hold >= 1 group, and groups a prefix (which may be empty) and candidates as
    _groups_problem asks."""
    for name, a, last, least in (("sequence", ix.seq_groups, len(ix.group_pieces) - 1, 1),
                                 ("group", ix.group_pieces, len(ix.piece_label), 1),
                                 ("piece", ix.piece_tokens, tokens, 0)):
        if a.size == 0 or a[0] != 0 or a[-1] != last or (np.diff(a) < least).any():
            return f"{name} offsets do not run from 0 to {last}"
    is_prefix = np.zeros(len(ix.piece_label), dtype=bool)
    is_prefix[ix.group_pieces[:-1]] = True
    if (is_prefix != (ix.piece_label == -1)).any() or not np.isin(ix.piece_label[~is_prefix], (0, 1)).all():
        return "piece labels are not -1 on prefixes and 0/1 on candidates"
    return _groups_problem(np.diff(ix.group_pieces) - 1,
                           _segment_sums((ix.piece_label == 1).astype(np.int64), ix.group_pieces),
                           np.diff(ix.piece_tokens)[~is_prefix])


class _Shard:
    def __init__(self, idx_path: Path, maps: _FileMaps):
        self.name = idx_path.with_suffix("")
        with open(idx_path, "rb") as f:
            self._idx_stat = os.fstat(f.fileno())  # the file every later map must be
            head = f.read(_HEADER.size)
        size = self._idx_stat.st_size
        if len(head) < _HEADER.size:
            raise DatasetFormatError(f"{idx_path}: {size} bytes, shorter than the {_HEADER.size}-byte header (truncated?)")
        magic, version, k, dt, seq_length, S, G, P, T = _HEADER.unpack(head)
        if magic != MAGIC:
            raise DatasetFormatError(f"{idx_path}: not a dataset index (magic {magic!r}, expected {MAGIC!r})")
        if version not in (1, VERSION):
            raise DatasetFormatError(f"{idx_path}: index version {version}, this reader knows 1 and {VERSION}")
        if k != (len(COUNTS) if version == VERSION else 0):
            raise DatasetFormatError(f"{idx_path}: {k} per-sequence count columns in a version-{version} index "
                                     "(corrupt header)")
        dt = dt.rstrip(b"\0")
        try:
            self.dtype = np.dtype(dt.decode())
        except (TypeError, ValueError):  # no dtype's name (UnicodeDecodeError is a ValueError)
            self.dtype = None
        # What the writer writes (token_dtype), in either byte order: the ids of another would be
        # wrong (int16 turns ids >= 32768 negative, and Group checks no range of 16-bit ids).
        if self.dtype is None or self.dtype.newbyteorder("=") not in (np.dtype(np.uint16), np.dtype(np.int32)):
            raise DatasetFormatError(f"{idx_path}: token dtype {dt!r}, expected uint16 or int32 (corrupt header)")
        self.seq_length = int(seq_length)
        sizes = [(S + 1, np.int64), (G + 1, np.int64), (P + 1, np.int64), (G, np.int64), (P, np.int8)]
        self._layout, off = [], _HEADER.size
        for n, t in sizes:
            nbytes = n * np.dtype(t).itemsize
            self._layout.append((off, off + nbytes, np.dtype(t).newbyteorder("<")))
            off += nbytes
        if k:
            off += -off % 8
            self._layout.append((off, off + k * S * 8, np.dtype("<i8")))
            off += k * S * 8
        if size != off:
            raise DatasetFormatError(
                f"{idx_path}: {size} bytes, expected {off} for {S} sequences, {G} groups and {P} pieces "
                "(truncated or corrupt)")
        self._idx_path, self._maps, self._num_sequences = idx_path, maps, int(S)
        bin_path = idx_path.with_suffix(".bin")
        if not bin_path.is_file():
            raise DatasetFormatError(f"{bin_path}: missing (the index {idx_path.name} needs it)")
        self._bin_stat = bin_path.stat()
        if self._bin_stat.st_size != T * self.dtype.itemsize:
            raise DatasetFormatError(
                f"{bin_path}: {self._bin_stat.st_size} bytes, expected {T * self.dtype.itemsize} "
                f"({T} tokens of {self.dtype.name}; truncated or corrupt)")
        self._bin_path, self._num_tokens, self.num_groups = bin_path, int(T), int(G)
        ix = self.index
        if ix.counts is None:
            self.verify()  # its counts are computed from the whole index anyway
        else:
            # O(sequences): the sequence offsets, and the counts the run plans with against them
            sg, c = ix.seq_groups, ix.counts
            tokens = c[COUNTS.index("tokens")]
            if sg[0] != 0 or sg[-1] != G or (np.diff(sg) < 1).any():
                self._corrupt(f"sequence offsets do not run from 0 to {G}")
            if (c < 0).any() or (c[COUNTS.index("groups")] != np.diff(sg)).any() or tokens.sum() != T:
                self._corrupt(f"per-sequence counts disagree with the index's {G} groups and {T} tokens")
            # as written; and token counts wrapping around int64 add up to T as well
            over = np.flatnonzero(tokens > self.seq_length)
            if over.size:
                self._corrupt(f"its tokens count is {tokens[over[0]]}, more than seq_length {self.seq_length}",
                              int(over[0]))
        meta_path = idx_path.with_suffix(".json")
        try:
            self.meta = json.loads(meta_path.read_bytes()) if meta_path.is_file() else {}
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise DatasetFormatError(f"{meta_path}: not valid JSON: {e}") from e
        if not isinstance(self.meta, dict):
            raise DatasetFormatError(f"{meta_path}: not a JSON object (got {type(self.meta).__name__})")
        if self.meta.get("seq_length", self.seq_length) != self.seq_length:
            raise DatasetFormatError(f"{meta_path}: seq_length {self.meta['seq_length']} disagrees with the "
                                     f"index's {self.seq_length}")

    def _corrupt(self, what: str, sequence: int | None = None):
        at = "" if sequence is None else f"packed sequence {sequence}: "
        raise DatasetFormatError(f"{self._idx_path}: {at}{what} (corrupt; rebuild the shard)")

    def verify(self) -> None:
        """Checks the whole index: offsets, labels, and (version 2) every sequence's counts."""
        ix = self.index
        problem = _check_offsets(ix, self._num_tokens)
        if problem:
            self._corrupt(problem)
        if ix.counts is not None:
            counts = _sequence_counts(ix)
            for c, key in enumerate(COUNTS):
                bad = np.flatnonzero(counts[key] != ix.counts[c])
                if bad.size:
                    self._corrupt(f"its {key} count is {ix.counts[c][bad[0]]}, its groups hold "
                                  f"{counts[key][bad[0]]} ({bad.size} sequence(s) disagree)", int(bad[0]))

    def check_sequence(self, j: int, ix: _Index) -> tuple[int, int]:
        """Its groups' range, once sequence j of a version-2 index is found whole: offsets within
        the shard, labels, counts equal to what its groups hold. Costs O(its pieces). The same checks
        as _check_offsets and _sequence_counts, written for one sequence (reduceat, no offset
        rebasing): through those two it took about 3x as long per read (~200 against ~70 us)."""
        g0, g1 = int(ix.seq_groups[j]), int(ix.seq_groups[j + 1])  # checked at open
        if ix.counts is None:
            return g0, g1  # checked whole at open
        gp = ix.group_pieces[g0:g1 + 1]
        p0, p1 = int(gp[0]), int(gp[-1])
        if p0 < 0 or p1 > len(ix.piece_label) or (gp[1:] <= gp[:-1]).any():
            self._corrupt("group offsets out of order or out of the index", j)
        pt = ix.piece_tokens[p0:p1 + 1]
        if pt[0] < 0 or pt[-1] > self._num_tokens or (pt[1:] < pt[:-1]).any():
            self._corrupt("piece offsets out of order or out of the token file", j)
        labels = ix.piece_label[p0:p1]
        starts = gp[:-1] - p0
        # -1 exactly on each group's first piece, 0/1 elsewhere
        if ((labels[starts] != -1).any() or int((labels == -1).sum()) != g1 - g0 or (labels < -1).any()
                or (labels > 1).any()):
            self._corrupt("piece labels are not -1 on prefixes and 0/1 on candidates", j)
        piece_len = np.diff(pt)
        is_cand = labels >= 0
        n_pos, n_cand = np.add.reduceat(labels == 1, starts, dtype=np.int64), np.diff(gp) - 1
        problem = _groups_problem(n_cand, n_pos, piece_len[is_cand])
        if problem:
            self._corrupt(problem, j)
        per_group = per_group_counts(np.add.reduceat(piece_len, starts), n_pos, n_cand, piece_len[starts],
                                     np.add.reduceat(np.where(is_cand, piece_len * piece_len, 0), starts))
        for c, key in enumerate(COUNTS):
            held, said = int(per_group[key].sum()), int(ix.counts[c, j])
            if held != said:
                self._corrupt(f"its {key} count is {said}, its groups hold {held}", j)
        return g0, g1

    def sequence_counts(self) -> dict:
        """COUNTS of every sequence (int64 arrays): read from a version-2 index, else computed."""
        ix = self.index
        if ix.counts is None:
            return _sequence_counts(ix)
        return {k: np.array(ix.counts[c]) for c, k in enumerate(COUNTS)}

    @property
    def index(self) -> _Index:
        """The index arrays, memory-mapped on use."""
        def view(raw):
            # plain arrays over the map: numpy's memmap subclass costs microseconds on every slice
            raw = raw.view(np.ndarray)
            arrays = [raw[a:b].view(dt) for a, b, dt in self._layout]
            counts = arrays[5].reshape(len(COUNTS), -1) if len(arrays) > 5 else None
            return _Index(*arrays[:5], counts=counts)

        return self._maps.get(self._idx_path, self._idx_stat, view)

    def __len__(self) -> int:
        return self._num_sequences

    def read_groups(self, g0: int, g1: int, ix: _Index) -> list[Group]:
        """Groups g0 .. g1 - 1 (a packed sequence), whose tokens lie back to back in the .bin: read
        with one positional read of exactly their bytes into one array the groups' pieces view.
        Not through a map: a page fault reads around the page (the device's read-ahead, 128 KB to
        MBs), and on data larger than the page cache that reads many times the bytes used
        (benchmarks/dataset_cold_read.py)."""
        p0, p1 = int(ix.group_pieces[g0]), int(ix.group_pieces[g1])
        bounds = ix.piece_tokens[p0:p1 + 1]
        t0 = int(bounds[0])
        span = np.empty(int(bounds[-1]) - t0, self.dtype)
        if span.size:
            self._maps.file(self._bin_path, self._bin_stat).read_into(
                span, t0 * self.dtype.itemsize)
        pieces = np.split(span, bounds[1:-1] - t0)
        labels = np.array(ix.piece_label[p0:p1])
        firsts = ix.group_pieces[g0:g1 + 1] - p0
        return [Group(prefix=pieces[a], candidates=pieces[a + 1:b], labels=labels[a + 1:b])
                for a, b in zip(firsts[:-1].tolist(), firsts[1:].tolist())]


# The ids the data was written with. Not the tokenizer's name: it is a path on the machine that
# built the shard, and shards built elsewhere from the same tokenizer name it differently.
_AGREED = ("vocab_size", "pad_id", "bos_id")


def _build_of(name: Path, meta: dict):
    b = meta.get("build")
    if b is None:
        return None
    ok = (isinstance(b, dict) and isinstance(b.get("id"), str) and isinstance(b.get("inputs"), str)
          and all(type(b.get(k)) is int for k in ("shard_index", "num_shards"))
          and 0 <= b["shard_index"] < b["num_shards"])
    if not ok:
        raise DatasetFormatError(f"{name}.json: build must be {{id, shard_index, num_shards, inputs}} with "
                                 f"0 <= shard_index < num_shards, got {b!r:.200}")
    return b


def check_build_sets(directory: Path, shards: list[tuple[Path, dict]]) -> None:
    """DatasetFormatError naming the directory and the files unless every build set among the
    (shard name, metadata) pairs is complete, has no shard twice, and no two share their inputs."""
    sets: dict[str, dict] = {}
    for name, meta in shards:
        b = _build_of(name, meta)
        if b is not None:
            s = sets.setdefault(b["id"], {"n": b["num_shards"], "inputs": b["inputs"], "at": {}})
            if (b["num_shards"], b["inputs"]) != (s["n"], s["inputs"]):
                raise DatasetFormatError(f"{name}.json: build {b['id']} has num_shards {b['num_shards']} and inputs "
                                         f"{b['inputs']}, other shards of it {s['n']} and {s['inputs']}")
            s["at"].setdefault(b["shard_index"], []).append(name.name)
    problems, by_inputs = [], {}
    for bid, s in sets.items():
        n, at = s["n"], s["at"]
        present = ", ".join(sorted(x for names in at.values() for x in names))
        for i, names in sorted(at.items()):
            if len(names) > 1:
                problems.append(f"shard {i} of {n} of build {bid} is there {len(names)} times ({', '.join(names)})")
        missing = [i for i in range(n) if i not in at]
        if missing:
            # Builders name shards part-IIIII-of-NNNNN: the missing names follow from a present one.
            j, name = next((j, names[0]) for j, names in at.items())
            tag = f"{j:05d}-of-{n:05d}"
            names = [name.replace(tag, f"{i:05d}-of-{n:05d}") if tag in name else f"shard {i}" for i in missing]
            # a shard whose metadata was lost is there but not known as this build's
            hint = ", ".join(m + (" (its .idx is there, its .json metadata is missing)"
                                  if (directory / f"{m}.idx").is_file() and not (directory / f"{m}.json").is_file()
                                  else "") for m in names)
            problems.append(f"build {bid} of {n} shards lacks {len(missing)} ({hint}; present: {present})")
        by_inputs.setdefault(s["inputs"], []).append(f"build {bid} ({present})")
    for builds in by_inputs.values():
        if len(builds) > 1:
            problems.append(f"the same inputs were built more than once, their records would be read "
                            f"{len(builds)} times: {'; '.join(builds)} (leftovers of an earlier build?)")
    if problems:
        raise DatasetFormatError(f"{directory}: " + "; ".join(problems))


def foreign_shards(directory: Path, build_id: str) -> list[str]:
    """Names of the complete shards in `directory` that are not of build `build_id`."""
    out = []
    for idx in sorted(Path(directory).glob("*.idx")):
        try:
            meta = json.loads(idx.with_suffix(".json").read_text())
        except (OSError, ValueError):
            meta = {}
        b = meta.get("build") if isinstance(meta, dict) else None
        if not isinstance(b, dict) or b.get("id") != build_id:
            out.append(idx.stem)
    return out


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of values[offsets[i]:offsets[i+1]] for each i, in one pass."""
    cs = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=cs[1:])
    return cs[offsets[1:]] - cs[offsets[:-1]]


def _sequence_counts(ix: _Index) -> dict:
    """engine.data.per_group_counts of the index's groups, summed per sequence (int64 arrays)."""
    piece_len = np.diff(ix.piece_tokens)
    is_prefix = ix.piece_label < 0
    lengths = _segment_sums(piece_len, ix.group_pieces)
    n_cand = np.diff(ix.group_pieces) - 1
    n_pos = _segment_sums((ix.piece_label == 1).astype(np.int64), ix.group_pieces)
    cand_sq = _segment_sums(np.where(is_prefix, 0, piece_len * piece_len), ix.group_pieces)
    per_group = per_group_counts(lengths, n_pos, n_cand, piece_len[is_prefix], cand_sq)
    return {k: _segment_sums(per_group[k], ix.seq_groups) for k in COUNTS}


def _narrow(a: np.ndarray) -> np.ndarray:
    """`a` (non-negative integers) as int32 when its values fit, else as it is."""
    return a.astype(np.int32) if a.size == 0 or a.max() <= np.iinfo(np.int32).max else a


class IndexedDataset:
    """A directory of shards (or one shard's path without suffix): indexes memory-mapped, tokens
    read with one positional read per packed sequence (at most 128 of the shards' index maps and
    token files open at once). What a dataset keeps in private memory is O(sequences): the
    per-sequence counts below and the shard offsets.

    Offers what GlobalBatchLoader and Trainer.evaluate use: len (packed sequences), seq_length,
    sequences(indices), per_sequence, num_real_tokens, packing_efficiency. Only the requested
    sequences are read; a sequence's groups view one array of its tokens.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            idx = sorted(self.path.glob("*.idx"))
            if not idx:
                raise DatasetFormatError(f"{self.path}: no shards (*.idx) in this directory")
        elif self.path.with_name(self.path.name + ".idx").is_file():
            idx = [self.path.with_name(self.path.name + ".idx")]
        else:
            raise DatasetFormatError(f"{self.path}: no such dataset directory or shard")
        self._maps = _FileMaps()
        self.shards = [_Shard(p, self._maps) for p in idx]
        if self.path.is_dir():
            check_build_sets(self.path, [(s.name, s.meta) for s in self.shards])
        first = self.shards[0]
        for s in self.shards[1:]:
            for key, a, b in (("seq_length", first.seq_length, s.seq_length),
                              *((k, first.meta.get(k), s.meta.get(k)) for k in _AGREED)):
                if a != b:
                    raise DatasetFormatError(f"{s.name}: {key} {b} differs from {first.name}'s {a}; "
                                             "shards of one dataset must agree")
        self.seq_length = first.seq_length
        self.meta = dict(first.meta)
        self._seq_start = np.cumsum([0] + [len(s) for s in self.shards])

        parts = [s.sequence_counts() for s in self.shards]
        # int32 where the values fit (all but attention pairs of very long packs): every rank holds
        # these for the whole dataset, 5-6 numbers a packed sequence (sums are taken in int64)
        self.per_sequence = {k: _narrow(np.concatenate([p[k] for p in parts])) for k in COUNTS}
        self.num_real_tokens = int(self.per_sequence["tokens"].sum())
        self.num_groups = int(self.per_sequence["groups"].sum())

    def _lengths(self, key: str) -> np.ndarray:
        """Per-group or per-piece lengths over all shards (polar data stats, benchmarks)."""
        parts = []
        for ix in (s.index for s in self.shards):
            if key == "candidates_per_group":
                parts.append(np.diff(ix.group_pieces) - 1)
            elif key == "group":
                parts.append(_segment_sums(np.diff(ix.piece_tokens), ix.group_pieces))
            else:  # pieces: a group's first is its prefix (label -1), the others its candidates
                parts.append(np.diff(ix.piece_tokens)[(ix.piece_label < 0) == (key == "prefix")])
        return np.concatenate(parts)

    @property
    def group_lengths(self) -> np.ndarray:
        return self._lengths("group")

    @property
    def prefix_lengths(self) -> np.ndarray:
        return self._lengths("prefix")

    @property
    def candidate_lengths(self) -> np.ndarray:
        return self._lengths("candidate")

    @property
    def candidates_per_group(self) -> np.ndarray:
        return self._lengths("candidates_per_group")

    def __len__(self) -> int:
        return int(self._seq_start[-1])

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        k = int(np.searchsorted(self._seq_start, i, side="right")) - 1
        return self.shards[k], i - int(self._seq_start[k])

    def sequences(self, indices) -> list[list[Group]]:
        # Every sequence is checked before any group is copied: the checks' short-lived arrays,
        # interleaved with the groups kept, would leave the heap fragmented (numpy keeps small freed
        # buffers for reuse, and each pins a page between the groups once they are freed).
        spans = []
        for i in indices:
            shard, j = self._locate(int(i))
            spans.append((shard, shard.check_sequence(j, shard.index)))
        return [shard.read_groups(g0, g1, shard.index) for shard, (g0, g1) in spans]

    def verify(self, log=None, every_s: float = 10.0) -> None:
        """Checks every shard's whole index (a run checks only the sequences it reads, as it reads
        them); DatasetFormatError names the file (and the sequence, for a count). With `log` (a
        function of one line), a progress line every `every_s` seconds: at 10^9 groups this takes
        minutes."""
        total, done, n = self.num_groups, 0, len(self.shards)
        start = last = time.monotonic()
        for k, s in enumerate(self.shards):
            s.verify()
            done += s.num_groups
            now = time.monotonic()
            if log is not None and k + 1 < n and now - last >= every_s:
                rate = done / max(now - start, 1e-9)
                log(f"{self.path}: checked {k + 1}/{n} shards, {done:,}/{total:,} groups ({rate:,.0f} groups/s, "
                    f"ETA {(total - done) / max(rate, 1e-9):.0f} s)")
                last = now

    def sources(self, i: int) -> np.ndarray:
        """The builder's record ids of the groups in sequence i (tests and debugging)."""
        shard, j = self._locate(int(i))
        ix = shard.index
        return np.array(ix.group_source[ix.seq_groups[j]:ix.seq_groups[j + 1]])

    @property
    def packing_efficiency(self) -> float:
        return self.num_real_tokens / max(1, len(self) * self.seq_length)
