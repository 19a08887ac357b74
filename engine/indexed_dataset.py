"""The reader of a packed dataset for training (the format: engine/shard_format.py): a packed
sequence at a time, its part of the index and its tokens read with positional reads of exactly
their bytes.

Opening a version-2 shard reads O(sequences) of its index (seq_groups and counts), not O(groups):
at 10^9 groups every rank of every node would otherwise read and check the whole index (tens of
GB) before the first step. What a rank reads of a sequence is checked as it is read (offsets,
labels, and its counts recomputed; its token ids against the vocabulary), so a damaged index or
token file still stops the run with the file and sequence named instead of training on garbage;
`IndexedDataset.verify()` (`polar data stats`, `engine/pretrain.py --check-config`) checks every
sequence's index in one pass. Version 1 (no counts) is read, checked and counted whole at open.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from engine.build_sets import check_build_sets, ids_disagreement
from engine.group import Group, per_group_counts
from engine.shard_files import OpenFiles, check_unchanged, removed_since_opened
from engine.shard_format import (COUNTS, HEADER, MAGIC, VERSION, DatasetFormatError, DatasetTokenError, ShardIndex,
                                 check_offsets, groups_problem, segment_sums, sequence_counts)
from engine.worker_processes import die_with_parent, kill_workers


# Groups a pass over a whole index checks at once (_Shard.verify): ~150 bytes a group of transient arrays,
# 157.7 MiB for a chunk of 2^20 (benchmarks/RESULTS.md, thirteenth session).
CHUNK_GROUPS = 1 << 20


class SequenceIndex(NamedTuple):
    """What a shard's index says of one packed sequence: its groups g0 .. g1 - 1, their first pieces
    (group_pieces[g0 .. g1], shard-wide numbers), and the pieces' token offsets and labels."""
    g0: int
    g1: int
    group_pieces: np.ndarray  # [g1 - g0 + 1]
    piece_tokens: np.ndarray  # [pieces + 1], offsets into the token file
    piece_label: np.ndarray  # [pieces]
    sequence: int  # j, its number in the shard


class _Shard:
    def __init__(self, idx_path: Path, files: OpenFiles):
        self.name = idx_path.with_suffix("")
        # opened once, for the reads at open and after (files keeps it): every rank opens every shard, and
        # each open of a file and each look at a name is a request to a shared file system's metadata server
        fd = os.open(idx_path, os.O_RDONLY)
        try:
            self._idx_stat = os.fstat(fd)  # the file every later read must be
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISDIR(self._idx_stat.st_mode):  # as open() refuses it
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(idx_path))
        files.adopt(idx_path, fd, self._idx_stat)
        size = self._idx_stat.st_size
        if size < HEADER.size:
            raise DatasetFormatError(f"{idx_path}: {size} bytes, shorter than the {HEADER.size}-byte header (truncated?)")
        head = files.read(idx_path, self._idx_stat, 0, HEADER.size, np.dtype(np.uint8)).tobytes()
        magic, version, k, dt, seq_length, S, G, P, T = HEADER.unpack(head)
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
        self._layout, off = [], HEADER.size
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
        self._idx_path, self._files, self._num_sequences, self._version = idx_path, files, int(S), version
        bin_path = idx_path.with_suffix(".bin")
        try:  # one look at the name (is_file, then stat, were two)
            self._bin_stat = bin_path.stat()
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            self._bin_stat = None
        if self._bin_stat is None or not stat.S_ISREG(self._bin_stat.st_mode):
            raise DatasetFormatError(f"{bin_path}: missing (the index {idx_path.name} needs it)")
        # the index is still the one read: a --force rebuild removes the old .idx first and puts the new one in
        # place last (engine.shard_writer), and the .bin just looked at may be the new one, of the same size
        try:
            check_unchanged(idx_path, os.stat(idx_path), self._idx_stat)
        except FileNotFoundError:
            raise removed_since_opened(idx_path) from None
        if self._bin_stat.st_size != T * self.dtype.itemsize:
            raise DatasetFormatError(
                f"{bin_path}: {self._bin_stat.st_size} bytes, expected {T * self.dtype.itemsize} "
                f"({T} tokens of {self.dtype.name}; truncated or corrupt)")
        self._bin_path, self._num_tokens, self.num_groups, self._num_pieces = bin_path, int(T), int(G), int(P)
        if version == 1:
            self.verify()  # its counts are computed from the whole index anyway
        else:
            # O(sequences): the sequence offsets, and the counts the run plans with against them
            sg, c = self._read(0, 0, S + 1), self._counts()
            tokens = c[COUNTS.index("tokens")]
            if sg[0] != 0 or sg[-1] != G or (sg[1:] <= sg[:-1]).any():  # as check_offsets: no difference wraps
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
            raw = meta_path.read_bytes()  # no is_file() first: one request less
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raw = None
        try:
            self.meta = json.loads(raw) if raw is not None else {}
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise DatasetFormatError(f"{meta_path}: not valid JSON: {e}") from e
        if not isinstance(self.meta, dict):
            raise DatasetFormatError(f"{meta_path}: not a JSON object (got {type(self.meta).__name__})")
        if self.meta.get("seq_length", self.seq_length) != self.seq_length:
            raise DatasetFormatError(f"{meta_path}: seq_length {self.meta['seq_length']} disagrees with the "
                                     f"index's {self.seq_length}")
        vocab = self.meta.get("vocab_size")
        # the writer refuses ids outside [0, vocab_size) (engine.shard_writer), so one read is damage;
        # unchecked, it reached the embedding: a CUDA device-side assert naming neither file nor sequence
        self._vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None
        # One reduction a sequence, over the ids as stored and read unsigned: a negative int32 is then
        # >= 2^31, so the largest is damage iff it reaches the limit (the min and max of the widened ids
        # took two passes, and a uint16 shard's widened copy). None where no stored id can be damage
        # (uint16 ids of a vocabulary past 65535, or of none named).
        self._unsigned = np.dtype(self.dtype.str.replace("i", "u"))
        limit = self._vocab
        if self.dtype.kind == "i":
            limit = min(limit or 1 << 31, 1 << 31)
        self._id_limit = limit if limit is not None and limit <= np.iinfo(self._unsigned).max else None

    def _corrupt(self, what: str, sequence: int | None = None):
        at = "" if sequence is None else f"packed sequence {sequence}: "
        raise DatasetFormatError(f"{self._idx_path}: {at}{what} (corrupt; rebuild the shard)")

    def _read(self, array: int, start: int, stop: int) -> np.ndarray:
        """Elements start .. stop - 1 of index array `array` (in engine/shard_format.py's order), read."""
        begin, _, dtype = self._layout[array]
        return self._files.read(self._idx_path, self._idx_stat, begin + start * dtype.itemsize, stop - start, dtype)

    def _counts(self) -> np.ndarray:
        """The per-sequence counts of a version-2 index, [len(COUNTS), sequences], read."""
        return self._read(5, 0, len(COUNTS) * self._num_sequences).reshape(len(COUNTS), -1)

    def mapped_index(self) -> ShardIndex:
        """The whole index, memory-mapped for one pass over it (verify, statistics): not kept, so
        the map and its descriptor go with the caller's last array."""
        with open(self._idx_path, "rb") as f:
            check_unchanged(self._idx_path, os.fstat(f.fileno()), self._idx_stat)
            raw = np.memmap(f, dtype=np.uint8, mode="r")
        # plain arrays over the map: numpy's memmap subclass costs microseconds on every slice
        raw = raw.view(np.ndarray)
        arrays = [raw[a:b].view(dt) for a, b, dt in self._layout]
        return ShardIndex(*arrays[:5], counts=arrays[5].reshape(len(COUNTS), -1) if len(arrays) > 5 else None)

    def verify(self, each=None) -> None:
        """Checks the whole index: offsets, labels, every sequence's tokens against seq_length, and
        (version 2) every sequence's counts. A run of whole sequences of about CHUNK_GROUPS groups
        at a time, so the memory it takes follows that, not the shard (~150 bytes a group checked
        at once: GBs for a shard of 10^7 groups, in every worker of a pass). `each(chunk)`, where
        given, is called with every chunk once checked (a ShardIndex whose offsets start at 0)."""
        ix = self.mapped_index()
        S, G, P, T = self._num_sequences, self.num_groups, self._num_pieces, self._num_tokens
        sg = np.array(ix.seq_groups)  # O(sequences)
        ends = (("sequence", sg, G), ("group", ix.group_pieces, P), ("piece", ix.piece_tokens, T))
        for name, a, last in ends:
            if a[0] != 0 or a[-1] != last:
                self._corrupt(f"{name} offsets do not run from 0 to {last}")
        if (sg[1:] <= sg[:-1]).any():  # compared, not subtracted: differences past 2**62 wrap around
            self._corrupt(f"sequence offsets do not run from 0 to {G}")
        starts = np.searchsorted(sg, np.arange(0, G, CHUNK_GROUPS), side="right") - 1
        edges = np.unique(np.concatenate([starts, [S]])).tolist()
        for s0, s1 in zip(edges[:-1], edges[1:]):
            g0, g1 = int(sg[s0]), int(sg[s1])
            gp = ix.group_pieces[g0:g1 + 1]
            if gp[0] < 0 or gp[-1] > P or (gp[1:] <= gp[:-1]).any():  # within 0..P before it is used to slice
                self._corrupt(f"group offsets do not run from 0 to {P}")
            p0, p1 = int(gp[0]), int(gp[-1])
            pt = ix.piece_tokens[p0:p1 + 1]
            if pt[0] < 0 or pt[-1] > T or (pt[1:] < pt[:-1]).any():
                self._corrupt(f"piece offsets do not run from 0 to {T}")
            chunk = ShardIndex(sg[s0:s1 + 1] - g0, gp - p0, pt - pt[0], ix.group_source[g0:g1], ix.piece_label[p0:p1],
                               counts=None if ix.counts is None else ix.counts[:, s0:s1])
            problem = check_offsets(chunk, int(pt[-1] - pt[0]))  # the offsets pass: labels and groups
            if problem:
                self._corrupt(problem)
            counts = sequence_counts(chunk)
            if chunk.counts is not None:
                for c, key in enumerate(COUNTS):
                    bad = np.flatnonzero(counts[key] != chunk.counts[c])
                    if bad.size:
                        self._corrupt(f"its {key} count is {chunk.counts[c][bad[0]]}, its groups hold "
                                      f"{counts[key][bad[0]]} ({bad.size} sequence(s) disagree)", s0 + int(bad[0]))
            # Version 2 checks its token counts at open; a version-1 sequence is as long as its offsets
            # say, and one past seq_length would stop the run in collate, naming neither shard nor sequence.
            over = np.flatnonzero(counts["tokens"] > self.seq_length)
            if over.size:
                self._corrupt(f"its groups hold {counts['tokens'][over[0]]} tokens, more than seq_length "
                              f"{self.seq_length}", s0 + int(over[0]))
            if each is not None:
                each(chunk)

    def sequence_index(self, j: int) -> SequenceIndex:
        """Sequence j's part of the index: one positional read of each array, exactly its elements
        (a map's page fault would read around it, the device's read-ahead). Offsets are checked
        before they are used to read."""
        g0, g1 = self._read(0, j, j + 2).tolist()  # checked at open
        gp = self._read(1, g0, g1 + 1)
        p0, p1 = int(gp[0]), int(gp[-1])
        if p0 < 0 or p1 > self._num_pieces or (gp[1:] <= gp[:-1]).any():
            self._corrupt("group offsets out of order or out of the index", j)
        return SequenceIndex(g0, g1, gp, self._read(2, p0, p1 + 1), self._read(4, p0, p1), j)

    def check_sequence(self, j: int, si: SequenceIndex, said) -> None:
        """Unless sequence j of a version-2 index is whole, DatasetFormatError naming it: piece
        offsets within the token file, labels, and the counts the run planned with (`said`, in
        COUNTS' order) equal to what its groups hold. Costs O(its pieces). The same checks as
        check_offsets and sequence_counts, written for one sequence (reduceat, no offset
        rebasing): through those two it took about 3x as long per read (~200 against ~70 us)."""
        if self._version == 1:
            return  # checked whole at open
        gp, pt, labels = si.group_pieces, si.piece_tokens, si.piece_label
        if pt[0] < 0 or pt[-1] > self._num_tokens or (pt[1:] < pt[:-1]).any():
            self._corrupt("piece offsets out of order or out of the token file", j)
        starts = gp[:-1] - gp[0]
        # -1 exactly on each group's first piece, 0/1 elsewhere
        if ((labels[starts] != -1).any() or int((labels == -1).sum()) != si.g1 - si.g0 or (labels < -1).any()
                or (labels > 1).any()):
            self._corrupt("piece labels are not -1 on prefixes and 0/1 on candidates", j)
        piece_len = np.diff(pt)
        is_cand = labels >= 0
        n_pos, n_cand = np.add.reduceat(labels == 1, starts, dtype=np.int64), np.diff(gp) - 1
        problem = groups_problem(n_cand, n_pos, piece_len[is_cand])
        if problem:
            self._corrupt(problem, j)
        per_group = per_group_counts(np.add.reduceat(piece_len, starts), n_pos, n_cand, piece_len[starts],
                                     np.add.reduceat(np.where(is_cand, piece_len * piece_len, 0), starts))
        for key, s in zip(COUNTS, said):
            held = int(per_group[key].sum())
            if held != int(s):
                self._corrupt(f"its {key} count is {s}, its groups hold {held}", j)

    def _bad_id(self, span: np.ndarray, j: int):
        """DatasetTokenError naming the .bin and sequence j, whose tokens `span` hold an id outside
        [0, vocab_size) of the shard's metadata (only negatives where it names none)."""
        low, high = int(span.min()), int(span.max())
        bad = low if low < 0 else high
        within = f"0..{self._vocab - 1}, the vocabulary it was built with" if self._vocab else "non-negative ids"
        raise DatasetTokenError(f"{self._bin_path}: packed sequence {j}: token id {bad} at token "
                                 f"{int(np.flatnonzero(span == bad)[0])} of its {span.size}, outside {within} "
                                 "(corrupt; rebuild the shard)")

    def sequence_counts(self) -> dict:
        """COUNTS of every sequence (int64 arrays): read from a version-2 index, else computed."""
        if self._version == 1:
            return sequence_counts(self.mapped_index())
        return dict(zip(COUNTS, self._counts()))

    def sources(self, j: int) -> np.ndarray:
        g0, g1 = self._read(0, j, j + 2).tolist()
        return self._read(3, g0, g1)

    def __len__(self) -> int:
        return self._num_sequences

    def read_groups(self, si: SequenceIndex) -> list[Group]:
        """The groups of a sequence check_sequence has passed, whose tokens lie back to back in the
        .bin: read with one positional read of exactly their bytes, widened to int32 once (not per
        piece), into one array the groups' pieces view."""
        bounds = (si.piece_tokens - si.piece_tokens[0]).tolist()
        t0 = int(si.piece_tokens[0])
        raw = self._files.read(self._bin_path, self._bin_stat, t0 * self.dtype.itemsize, bounds[-1], self.dtype)
        if self._id_limit is not None and raw.size and int(raw.view(self._unsigned).max()) >= self._id_limit:
            self._bad_id(raw.astype(np.int32), si.sequence)
        span = raw.astype(np.int32, copy=False)
        pieces = [span[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        labels = si.piece_label
        firsts = (si.group_pieces - si.group_pieces[0]).tolist()
        return [Group.checked(pieces[a], pieces[a + 1:b], labels[a + 1:b]) for a, b in zip(firsts[:-1], firsts[1:])]


def auto_workers(groups: int) -> int:
    """Processes for a pass over the whole index of `groups` groups: one below 10^7 groups, else one
    a core, at most 32. A pass takes ~0.15 s per 10^6 groups in one process and a fresh worker a
    fraction of a second to start (the reader imports no torch): at 10^7 groups on 2 cores two
    workers took 1.32 s against 1.63 s for one (benchmarks/data_stats.py); at POLAR's 10^9 one
    process takes minutes."""
    if groups < 10_000_000:
        return 1
    # the cores this process may run on: under Slurm, taskset or a container's cpuset, cpu_count() is the node's
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(32, cores))


def _in_worker(task):
    """fn of a shard, in a worker process: the shard opened again, as the file the dataset opened."""
    fn, idx_path, opened = task
    idx_path = Path(idx_path)
    # before the file is opened as a shard, which reads it (a version-1 index whole) and checks it against
    # the .bin: another index (a rebuild caught half-way) would be refused as a corrupt shard instead
    check_unchanged(idx_path, os.stat(idx_path), opened)
    shard = _Shard(idx_path, OpenFiles(16))
    check_unchanged(idx_path, shard._idx_stat, opened)  # the file opened: replaced after the stat
    return fn(shard)


def _explained(results):
    """`results`, with a worker's death explained."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        yield from results
    except BrokenProcessPool as e:
        raise RuntimeError("a worker process of the pass over the dataset's index died: killed (out of memory?), "
                           "or the calling script starts work when imported, which a spawned worker does (put it "
                           "under `if __name__ == \"__main__\":`); workers=1 runs the pass in this process") from e


def _narrow(a: np.ndarray) -> np.ndarray:
    """`a` (non-negative integers) in the narrowest of int16, int32 and int64 that holds its values.
    Signed: sums of int16/int32 arrays are taken in int64 by numpy, where unsigned ones would give
    uint64, which mixed with int64 turns float."""
    top = int(a.max()) if a.size else 0
    for t in (np.int16, np.int32):
        if top <= np.iinfo(t).max:
            return a.astype(t)
    return a


class IndexedDataset:
    """A directory of shards (or one shard's path without suffix), read with positional reads of
    exactly the bytes a packed sequence needs: a read of each index array, one of its tokens (at most
    a quarter of the open-file limit of the shards' files open at once, engine.shard_files). What a
    dataset keeps in private memory is O(sequences): the per-sequence counts below and the shard
    offsets.

    Offers what GlobalBatchLoader and Trainer.evaluate use: len (packed sequences), seq_length,
    sequences(indices), per_sequence, num_real_tokens, packing_efficiency. Only the requested
    sequences are read; a sequence's groups view one array of its tokens.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        is_dir = self.path.is_dir()
        if is_dir:
            idx = sorted(self.path.glob("*.idx"))
            if not idx:
                raise DatasetFormatError(f"{self.path}: no shards (*.idx) in this directory")
        elif self.path.with_name(self.path.name + ".idx").is_file():
            idx = [self.path.with_name(self.path.name + ".idx")]
        else:
            # `ds/part-00000-of-00001.idx` exists, but a shard is named without its suffix: say so
            stem = self.path.with_suffix("")
            hint = (f" (a shard is named without its suffix: {stem})"
                    if self.path.suffix in (".idx", ".bin", ".json") and stem.with_name(stem.name + ".idx").is_file()
                    else "")
            raise DatasetFormatError(f"{self.path}: no such dataset directory or shard{hint}")
        self._files = OpenFiles()
        self.shards = [_Shard(p, self._files) for p in idx]
        if is_dir:
            check_build_sets(self.path, [(s.name, s.meta) for s in self.shards])
        first = self.shards[0]
        for s in self.shards[1:]:
            differs = (("seq_length", first.seq_length, s.seq_length) if first.seq_length != s.seq_length
                       else ids_disagreement(first.meta, s.meta))
            if differs:
                key, a, b = differs
                why = (" (another tokenizer: the same id means another token in each)"
                       if key == "tokenizer_digest" else "")
                raise DatasetFormatError(f"{s.name}: {key} {b} differs from {first.name}'s {a}{why}; "
                                         "shards of one dataset must agree")
        self.seq_length = first.seq_length
        self.meta = dict(first.meta)
        self._seq_start = np.cumsum([0] + [len(s) for s in self.shards])

        # Every rank holds these for the whole dataset (~2*10^8 packed sequences at POLAR's scale), so
        # each narrowed shard by shard: int16 where the values fit (tokens, groups, pairs, ... of packs
        # up to 32k tokens), int32 (attention pairs), int64 only where needed; 14 bytes a sequence at
        # 16k packs, not 48. A column takes the widest of its shards' types.
        parts = [{k: _narrow(v) for k, v in s.sequence_counts().items()} for s in self.shards]
        self.per_sequence = {k: np.concatenate([p[k] for p in parts]) for k in COUNTS}
        self.num_real_tokens = int(self.per_sequence["tokens"].sum())
        self.num_groups = int(self.per_sequence["groups"].sum())

    def _lengths(self, key: str) -> np.ndarray:
        """Per-group or per-piece lengths over all shards, whole (O(groups): benchmarks and tests;
        polar data stats counts them chunk by chunk instead)."""
        parts = []
        for ix in (s.mapped_index() for s in self.shards):
            if key == "candidates_per_group":
                parts.append(np.diff(ix.group_pieces) - 1)
            elif key == "group":
                parts.append(segment_sums(np.diff(ix.piece_tokens), ix.group_pieces))
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
        spans, counts = [], [self.per_sequence[k] for k in COUNTS]
        for i in indices:
            shard, j = self._locate(int(i))
            si = shard.sequence_index(j)
            shard.check_sequence(j, si, [c[i] for c in counts])
            spans.append((shard, si))
        return [shard.read_groups(si) for shard, si in spans]

    def over_shards(self, fn, workers: int | None = None, log=None, every_s: float = 10.0) -> list:
        """[fn(shard) for each shard]: each_shard's results in a list."""
        return list(self.each_shard(fn, workers, log, every_s))

    def each_shard(self, fn, workers: int | None = None, log=None, every_s: float = 10.0):
        """fn(shard) for each shard in order, yielded as they come (a caller reducing them keeps one
        at a time), fn reading each shard's whole index (checks, statistics): at
        10^9 groups that is minutes in one process. With `workers` > 1 (None: auto_workers) the
        shards are shared out to that many fresh processes, each opening the shard the dataset
        opened (a file replaced since is refused); fn must then be a module-level function. With
        `log` (a function of one line), a progress line every `every_s` seconds. An error of fn
        (DatasetFormatError naming the file) is raised here."""
        n = len(self.shards)
        workers = min(auto_workers(self.num_groups) if workers is None else workers, n)
        pool = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: this process may hold threads (a loader, torch's pools) that fork would copy mid-lock.
            # An executor, not multiprocessing.Pool: a worker that dies (killed, or a script that starts
            # work on import) raises BrokenProcessPool here instead of being replaced forever.
            # A worker ends with this process: left behind by one killed (SIGTERM to it alone, SIGKILL)
            # it waited for work for good, holding its own call queue's pipe open.
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=die_with_parent, initargs=(os.getpid(),))
            results = pool.map(_in_worker, [(fn, str(s._idx_path), s._idx_stat) for s in self.shards])
        else:
            results = (fn(s) for s in self.shards)
        total, done = self.num_groups, 0
        start = last = time.monotonic()
        try:
            for k, (s, r) in enumerate(zip(self.shards, _explained(results))):
                yield r
                done += s.num_groups
                now = time.monotonic()
                if log is not None and k + 1 < n and now - last >= every_s:
                    rate = done / max(now - start, 1e-9)
                    log(f"{self.path}: checked {k + 1}/{n} shards, {done:,}/{total:,} groups ({rate:,.0f} groups/s, "
                        f"ETA {(total - done) / max(rate, 1e-9):.0f} s)")
                    last = now
        except BaseException:  # an error, Ctrl-C, the caller done early: the shards in flight are not waited for
            kill_workers(pool)
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def verify(self, log=None, every_s: float = 10.0, workers: int | None = None) -> None:
        """Checks every shard's whole index (a run checks only the sequences it reads, as it reads
        them); DatasetFormatError names the file (and the sequence, for a count). `workers`, `log`
        and `every_s` as in each_shard."""
        self.over_shards(_Shard.verify, workers, log, every_s)

    def sources(self, i: int) -> np.ndarray:
        """The builder's record ids of the groups in sequence i (tests and debugging)."""
        shard, j = self._locate(int(i))
        return shard.sources(j)

    @property
    def packing_efficiency(self) -> float:
        return self.num_real_tokens / max(1, len(self) * self.seq_length)
