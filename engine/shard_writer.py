"""Writes one shard of a packed dataset (the format: engine/shard_format.py)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

from engine import durable_file
from engine.file_lock import lock_for_life
from engine.group import Group
from engine.shard_format import (COUNTS, HEADER, MAGIC, VERSION, ShardIndex, groups_problem, segment_sums,
                                 sequence_counts, token_dtype)
from engine.signal_handlers import in_main_thread


class ShardBusy(OSError):
    """Another process is writing the same shard (its `.bin.tmp` is locked)."""


class ShardWriter:
    """Appends packed sequences to one shard; `close()` makes it visible to readers.

    Tokens stream to disk as they come, and so does the index: its arrays (a few int64 per group
    and piece, held in memory until close, where turning them into offsets and counts took ~230 bytes
    a group at once, 23 GB for a shard of 10^8) go to unnamed temporary files beside the shard (gone
    with the process, however it ends), written into the .idx at close a block at a time: memory is
    that of one add_sequences call, whatever the shard holds. Files are written under `.tmp` names
    and renamed at close, so a build killed midway leaves no shard a reader would mistake for
    complete; each is fsynced before its rename, the `.idx` (what makes a shard complete) last, so a
    crash of the machine does not either.
    """

    def __init__(self, path: str | os.PathLike, seq_length: int, vocab_size: int, pad_id: int,
                 meta: dict | None = None):
        self.path = Path(path)
        self.seq_length = int(seq_length)
        self.vocab_size = int(vocab_size)
        self.pad_id = int(pad_id)
        self.meta = dict(meta or {})
        self.dtype = token_dtype(self.vocab_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self.path.with_name(self.path.name + ".bin.tmp")
        # Locked before it is truncated: a second run of the same shard (a requeued job whose first
        # copy still runs) truncated the first's file under it, which then went on writing at its own
        # offset and closed a .bin of the right size holding zeros where its first tokens were.
        fd = os.open(self._tmp_bin, os.O_WRONLY | os.O_CREAT, 0o666)
        # on a file system without locks (some network mounts) there is nothing to check with
        lock_for_life(fd, ShardBusy(f"{self.path}: another process is writing this shard ({self._tmp_bin} is "
                                    "locked); wait for it to end or stop it"))
        os.ftruncate(fd, 0)
        for name in (".idx.tmp", ".json.tmp"):  # a killed writer's
            self._name(name).unlink(missing_ok=True)
        self._bin = os.fdopen(fd, "wb")
        self._spill = {}
        try:
            for k in _SPILLED:
                self._spill[k] = tempfile.TemporaryFile(dir=self.path.parent)
        except BaseException:
            self._close_files()
            raise
        self._tokens = 0
        self._sequences = 0
        self._groups = 0
        self._pieces = 0
        self._closed = False
        self.committed = False  # the shard's files are in place (close() got that far)

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
        problem = groups_problem(group_pieces - 1, segment_sums((piece_labels == 1).astype(np.int64), starts),
                                  piece_lengths[~is_prefix])
        if problem:
            raise ValueError(f"{problem}: engine.group.Group refuses it")
        group_tokens = segment_sums(piece_lengths, starts)
        seq_starts = np.zeros(seq_groups.size + 1, dtype=np.int64)
        np.cumsum(seq_groups, out=seq_starts[1:])
        seq_tokens = segment_sums(group_tokens, seq_starts)
        if seq_tokens.size and seq_tokens.max() > self.seq_length:
            raise ValueError(f"a sequence of {seq_tokens.max()} tokens does not fit seq_length={self.seq_length}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        sources = np.full(group_pieces.size, -1, np.int64) if sources is None else np.asarray(sources, dtype=np.int64)
        if sources.shape != group_pieces.shape:
            raise ValueError(f"{sources.size} sources for {group_pieces.size} groups")
        piece_starts = np.zeros(piece_lengths.size + 1, dtype=np.int64)
        np.cumsum(piece_lengths, out=piece_starts[1:])
        # a sequence's counts are its own groups': those of a run of sequences, offsets from 0, are the shard's
        counts = sequence_counts(ShardIndex(seq_starts, starts, piece_starts, sources, piece_labels, None))
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        for k, v in (("seq_groups", seq_groups), ("group_pieces", group_pieces), ("piece_lengths", piece_lengths),
                     ("sources", sources), ("piece_labels", piece_labels), *counts.items()):
            self._spill[k].write(v.astype(_SPILLED[k], copy=False).tobytes())
        self._tokens += tokens.size
        self._sequences += seq_groups.size
        self._groups += group_pieces.size
        self._pieces += piece_lengths.size

    @property
    def num_sequences(self) -> int:
        return self._sequences

    def sync(self) -> None:
        """The tokens written so far on the disk: the long part of close(), which a caller that must
        not be stopped while close() renames over an older shard may do first, while a stop is welcome."""
        self._bin.flush()
        os.fsync(self._bin.fileno())

    def close(self, with_files=()) -> dict:
        """Write the index and metadata, rename into place; returns the metadata written.
        `with_files`: (source, target) pairs of files that belong to the shard (a list of the records
        its build set aside), put in place with it, source None for a target to remove: a reader finds
        them with the shard they belong to, never beside another one (_put_in_place)."""
        if self._closed:
            raise ValueError(f"{self.path}: shard already closed")
        self._closed = True
        # the tokens on the disk before any name says the shard is complete: after a crash of the
        # machine the renames below could otherwise be there, the tokens not (a .bin of zeros)
        self.sync()
        try:
            return self._commit([(None if s is None else Path(s), Path(t)) for s, t in with_files])
        finally:
            # closed (the lock released) only now: a second run of this shard that started meanwhile
            # would truncate the .bin.tmp about to be renamed, and the .idx commit over an empty .bin
            self._close_files()

    def _close_files(self) -> None:
        self._bin.close()
        for f in self._spill.values():
            f.close()

    def _rewound(self, key: str):
        f = self._spill[key]
        f.flush()
        f.seek(0)
        return f

    def _copy_spilled(self, key: str, out) -> None:
        """The array `key` add_sequences wrote, as written (its .idx dtype), to `out`."""
        shutil.copyfileobj(self._rewound(key), out)

    def _spilled(self, key: str):
        """The array `key` add_sequences wrote, in blocks of up to _BLOCK elements."""
        f, dtype = self._rewound(key), np.dtype(_SPILLED[key])
        while True:
            data = f.read(_BLOCK * dtype.itemsize)
            if not data:
                return
            yield np.frombuffer(data, dtype=dtype)

    def _name(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def _commit(self, with_files: list) -> dict:
        S, G, P = self._sequences, self._groups, self._pieces
        header = HEADER.pack(MAGIC, VERSION, len(COUNTS), self.dtype.str.encode().ljust(8, b"\0"),
                              self.seq_length, S, G, P, self._tokens)
        meta = {**self.meta, "seq_length": self.seq_length, "vocab_size": self.vocab_size,
                "pad_id": self.pad_id, "token_dtype": self.dtype.name,
                "shard": {"sequences": S, "groups": G, "pieces": P, "tokens": self._tokens}}
        # Everything on the disk before anything is renamed over an older shard (--force): a full disk
        # or a quota, which a write-back file system reports at fsync, then fails with the old one
        # whole. Under fixed names: the .bin.tmp's lock keeps every other writer of this shard off them,
        # and the next run rewrites what a killed one left.
        with open(self._name(".idx.tmp"), "wb") as f:
            f.write(header)
            # the format's arrays in its order (engine/shard_format.py): the counts per sequence, group
            # and piece as offsets from 0, then sources and labels, padding, the per-sequence counts
            for k in ("seq_groups", "group_pieces", "piece_lengths"):
                end = np.zeros(1, dtype=np.int64)
                f.write(end.astype("<i8").tobytes())
                for block in self._spilled(k):
                    offsets = np.cumsum(block, dtype=np.int64) + end[0]
                    f.write(offsets.astype("<i8", copy=False).tobytes())
                    end = offsets[-1:]
            for k in ("sources", "piece_labels"):
                self._copy_spilled(k, f)
            f.write(b"\0" * (-f.tell() % 8))
            for k in COUNTS:
                self._copy_spilled(k, f)
            f.flush()
            os.fsync(f.fileno())
        with open(self._name(".json.tmp"), "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        for source, _ in with_files:
            if source is not None:
                durable_file.sync_file(source)
        self._put_in_place(with_files)
        return meta

    def _put_in_place(self, with_files: list) -> None:
        """The new files renamed over the shard's names, never a mix of two shards to a reader, who
        takes the .bin and .json beside an .idx for that index's (engine/indexed_dataset.py) and checks
        no more than their sizes: a rebuild of the same records under another seed, an old .idx beside
        the new .bin, read the old offsets over the new tokens without a word. So the old .idx goes
        first (no shard is there while the rest is replaced: a reader is refused, "no shard", not
        misled) and the new one comes last, each step on the disk before the next: a kill -9 or a crash
        of the machine at any point leaves the old shard, none, or the new one. Ctrl-C or a SIGTERM in
        between would leave none where both were whole: they are held back until the end (_held)."""
        dirs = dict.fromkeys([self.path.parent, *(t.parent for _, t in with_files)])
        idx, gone = self._name(".idx"), False
        with _held():
            try:
                if idx.exists():
                    idx.unlink()
                    gone = True
                    durable_file.sync_dir(self.path.parent)
                for source, target in with_files:
                    if source is None:
                        target.unlink(missing_ok=True)
                    else:
                        os.replace(source, target)
                os.replace(self._name(".json.tmp"), self._name(".json"))
                os.replace(self._tmp_bin, self._name(".bin"))
                for d in dirs:  # every name above on the disk before the .idx's
                    durable_file.sync_dir(d)
                os.replace(self._name(".idx.tmp"), idx)  # last: the shard is complete
                durable_file.sync_dir(self.path.parent)
            except OSError as e:
                kept = "the shard it replaces is gone: build it again" if gone else "nothing was replaced"
                raise OSError(e.errno, f"{self.path}: putting the shard in place failed ({e}); {kept}") from e
            self.committed = True

    def abort(self) -> None:
        """Drop everything written so far (a failed build leaves nothing behind); nothing once the
        shard is in place (its lock is gone: the .bin.tmp may be another writer's by now)."""
        if self.committed:
            return
        self._closed = True
        self._close_files()
        for name in (self._tmp_bin, self._name(".idx.tmp"), self._name(".json.tmp")):
            name.unlink(missing_ok=True)


# The index arrays add_sequences spills, with their dtype in the .idx; then the per-sequence counts.
_SPILLED = {"seq_groups": "<i8", "group_pieces": "<i8", "piece_lengths": "<i8", "sources": "<i8",
            "piece_labels": "i1", **{k: "<i8" for k in COUNTS}}
_BLOCK = 1 << 20  # elements of a spilled array read at a time at close


# Signals that would stop a shard's files half put in place: Ctrl-C, a scheduler's SIGTERM, a closed terminal
HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _held():
    """The block runs to its end: SIGINT, SIGTERM and SIGHUP that come meanwhile are passed to the
    handlers they would have met (KeyboardInterrupt, a build's stop, the default's end of the process)
    after it, once each, whether it ended normally or raised: a rename that failed (a full disk, an
    I/O error) dropped them, and a build told to stop by a scheduler's SIGTERM exited with the error's
    status, not 128 + 15, while Ctrl-C was lost. The block's error stays visible: a handler's
    exception carries it as its context, and it is printed before a default action ends the process.
    Python runs handlers in the main thread only, so only there can a signal raise mid-block;
    elsewhere nothing is installed (Python's rule for handlers)."""
    if not in_main_thread():
        yield
        return
    came: list[int] = []
    previous: dict = {}
    error = None
    try:
        for s in HELD:
            handler = signal.getsignal(s)
            if handler is not None and handler != signal.SIG_IGN:  # None: installed outside Python
                # swapping runs a signal that came before the block: it stops the block before it begins
                previous[s] = signal.signal(s, lambda signum, frame: came.append(signum))
        yield
    except BaseException as e:
        error = e
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(came):
            handler = previous[s]
            if handler == signal.SIG_DFL:
                if error is not None:  # the process ends next, and would say nothing of it
                    print(f"error: {error}", file=sys.stderr, flush=True)
                signal.raise_signal(s)  # with its default action back: the process ends as it would have
            else:
                handler(s, None)
