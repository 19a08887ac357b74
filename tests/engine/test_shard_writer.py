"""engine.shard_writer: what it writes, what it refuses, and that nothing unfinished is read."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data import PackedGroups
from engine.indexed_dataset import IndexedDataset
from engine.packing import Group
from engine.shard_writer import ShardBusy, ShardWriter
from tests.engine.test_indexed_dataset import SEQ, random_groups, same_groups, write


@pytest.fixture
def packed():
    return PackedGroups(random_groups(0, 120), SEQ)


@pytest.mark.parametrize("vocab,dtype", [(300, np.uint16), (1 << 16, np.uint16), (70000, np.int32)])
def test_token_dtype_follows_the_vocabulary(tmp_path, vocab, dtype):
    groups = random_groups(1, 30, vocab=vocab)
    packed = PackedGroups(groups, SEQ)
    write(tmp_path / "p", packed, vocab=vocab)
    assert (tmp_path / "p.bin").stat().st_size == packed.num_real_tokens * np.dtype(dtype).itemsize
    same_groups(IndexedDataset(tmp_path / "p").sequences(range(len(packed))), packed.sequences(range(len(packed))))


def test_writer_refuses_an_overfull_sequence_and_out_of_vocab_ids(tmp_path):
    w = ShardWriter(tmp_path / "x", 8, vocab_size=10, pad_id=0)
    g = Group(prefix=[1, 2, 3], candidates=[[4, 5], [6]], labels=[1, 0])
    with pytest.raises(ValueError, match="does not fit seq_length=8"):
        w.add_sequence([g, g])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        w.add_sequence([Group(prefix=[1], candidates=[[11], [2]], labels=[1, 0])])
    w.abort()
    assert list(tmp_path.iterdir()) == []  # nothing of an aborted shard remains


def test_an_unfinished_shard_is_invisible(tmp_path, packed):
    write(tmp_path / "done", packed)
    w = ShardWriter(tmp_path / "zz-running", SEQ, vocab_size=300, pad_id=1)
    w.add_sequence(packed.sequences([0])[0])
    assert len(IndexedDataset(tmp_path)) == len(packed)  # the open writer's files are .tmp


def test_the_writer_refuses_groups_the_reader_refuses(tmp_path):
    w = ShardWriter(tmp_path / "x", 8, vocab_size=10, pad_id=0)
    for lengths, labels in (([1, 1, 1], [-1, 1, 1]), ([1, 0, 1], [-1, 1, 0])):
        with pytest.raises(ValueError, match="a group without"):
            w.add_sequences(tokens=np.ones(sum(lengths), np.int64), piece_lengths=lengths, piece_labels=labels,
                            group_pieces=[3], seq_groups=[1])
    w.abort()


def test_a_second_writer_of_a_shard_being_written_is_refused(tmp_path, packed):
    """A second run of the same shard (a requeued job whose first copy still runs) truncated the
    first's .bin.tmp under it: the first closed a shard of the right size with zeros for its first
    tokens, which every check passes."""
    w = ShardWriter(tmp_path / "s", SEQ, vocab_size=300, pad_id=1)
    w.add_sequence(packed.sequences([0])[0])
    w._bin.flush()
    with pytest.raises(ShardBusy, match="another process is writing this shard"):
        ShardWriter(tmp_path / "s", SEQ, vocab_size=300, pad_id=1)
    for i in range(1, len(packed)):
        w.add_sequence(packed.sequences([i])[0])
    w.close()
    same_groups(IndexedDataset(tmp_path / "s").sequences(range(len(packed))), packed.sequences(range(len(packed))))
    again = ShardWriter(tmp_path / "t", SEQ, vocab_size=300, pad_id=1)  # a closed writer's lock is gone
    again.abort()
    ShardWriter(tmp_path / "t", SEQ, vocab_size=300, pad_id=1).abort()  # and an aborted one's


def test_a_shard_is_on_the_disk_before_its_idx_says_it_is_complete(tmp_path, packed, monkeypatch):
    """The .idx renamed last makes a shard complete; after a crash of the machine that rename could
    be on the disk while the tokens (never fsynced) were not: a shard of the right size holding
    zeros. Now the .bin is fsynced before its rename, the directory after it, and the .idx (and the
    .json) are written durably after that."""
    from tests.engine.durable_record import published_durably, record

    calls = record(monkeypatch.setattr)
    write(tmp_path / "s", packed)
    shard = str(tmp_path.resolve() / "s")
    renamed = calls.index(("replace", shard + ".bin.tmp", shard + ".bin"))
    assert ("fsync", shard + ".bin.tmp") in calls[:renamed]
    idx = published_durably(calls, shard + ".idx")
    assert ("fsync", str(tmp_path.resolve())) in calls[renamed + 1:idx]
    assert published_durably(calls, shard + ".json") < renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx", "s.json"]
    same_groups(IndexedDataset(tmp_path / "s").sequences(range(len(packed))), packed.sequences(range(len(packed))))


def test_a_shard_being_closed_is_still_refused_to_a_second_writer(tmp_path, packed, monkeypatch):
    """close() released the lock (closed the .bin.tmp) before it wrote the index, the .json and the
    renames, with their fsyncs: a second run of the shard starting then truncated the .bin.tmp the
    first was about to rename, which committed an .idx over an empty .bin. The lock is now held
    until the .idx is committed; the second writer, tried just before the .bin's rename, is refused."""
    real_replace, tried = os.replace, []

    def replace(src, dst, **kw):
        if str(src).endswith("s.bin.tmp"):
            try:
                tried.append(ShardWriter(tmp_path / "s", SEQ, vocab_size=300, pad_id=1))  # it goes on writing
            except ShardBusy:
                tried.append("refused")
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    write(tmp_path / "s", packed)
    assert tried == ["refused"]
    same_groups(IndexedDataset(tmp_path / "s").sequences(range(len(packed))), packed.sequences(range(len(packed))))


def test_a_rebuild_the_disk_refuses_leaves_the_old_shard_whole(tmp_path, packed, monkeypatch):
    """The .idx's bytes reached the disk only in its commit, after the new .bin had been renamed
    over the old one: a full disk or quota (which a write-back file system reports at fsync) then
    failed the rebuild with the old .idx beside the new .bin, a shard neither build wrote. Its bytes
    are now on the disk before anything is renamed, and the old shard stays as it was."""
    import errno

    old = PackedGroups(random_groups(5, 40), SEQ)
    write(tmp_path / "s", old)
    real_fsync = os.fsync

    def fsync(fd):
        name = os.path.basename(os.path.realpath(f"/proc/self/fd/{fd}"))
        if name == "s.idx.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    w = ShardWriter(tmp_path / "s", SEQ, vocab_size=300, pad_id=1)
    for i in range(len(packed)):
        w.add_sequence(packed.sequences([i])[0])
    with pytest.raises(OSError, match="No space left"):
        w.close()
    w.abort()
    monkeypatch.undo()
    same_groups(IndexedDataset(tmp_path / "s").sequences(range(len(old))), old.sequences(range(len(old))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx", "s.json"]


def test_a_stop_signal_held_while_a_rename_fails_ends_the_process_saying_why(tmp_path):
    """SIGTERM that came while close() put the shard in place was held to the end of the renames and
    passed on only if they all succeeded: one failing dropped it, and a process told to stop went on.
    It now ends the process by the signal (its default action here) after the failure, which is
    printed first: nothing else would say it."""
    root = Path(__file__).resolve().parents[2]
    script = ("import errno, os, signal, sys\n"
              "from engine.data import PackedGroups\n"
              "from engine.shard_writer import ShardWriter\n"
              "from tests.engine.test_indexed_dataset import SEQ, random_groups, write\n"
              "real = os.replace\n"
              "def replace(src, dst, **kw):\n"
              "    if str(src).endswith('.bin.tmp'):\n"
              "        raise OSError(errno.EIO, 'Input/output error')\n"
              "    real(src, dst, **kw)\n"
              "    if str(src).endswith('.json.tmp'):\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "os.replace = replace\n"
              "write(sys.argv[1], PackedGroups(random_groups(0, 20), SEQ))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s")], capture_output=True, text=True,
                          cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), timeout=300)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: [Errno 5] {tmp_path / 's'}: putting the shard in place failed ([Errno 5] "
                                  "Input/output error); nothing was replaced"), proc.stderr[-3000:]


def test_the_index_waits_on_the_disk_not_in_memory(tmp_path, monkeypatch):
    """The index arrays were held in memory until close, which turned them into offsets and counts
    at once: ~43 bytes a group held, ~230 at close, 23 GB for a shard of 10^8 groups. They go to
    temporary files now, and close reads them a block at a time (blocks made small here)."""
    import tracemalloc

    from engine import shard_writer

    monkeypatch.setattr(shard_writer, "_BLOCK", 1 << 12)
    per, calls = 4096, 25  # 102,400 groups of a prefix of 4 tokens and 2 candidates of 3, two a sequence
    w = ShardWriter(tmp_path / "s", 20, vocab_size=300, pad_id=0)
    tracemalloc.start()
    try:
        for i in range(calls):
            w.add_sequences(tokens=np.full(10 * per, 7), piece_lengths=np.tile([4, 3, 3], per),
                            piece_labels=np.tile([-1, 1, 0], per), group_pieces=np.full(per, 3),
                            seq_groups=np.full(per // 2, 2), sources=np.arange(i * per, (i + 1) * per))
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        w.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert held < 1 << 20 and peak < 2 << 20, (held, peak)  # were 4.8 MB and 27 MB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx", "s.json"]
    ds = IndexedDataset(tmp_path / "s")
    n = per * calls
    assert len(ds) == n // 2 and ds.num_groups == n
    np.testing.assert_array_equal(np.concatenate([ds.sources(i) for i in range(len(ds))]), np.arange(n))
    assert (ds.per_sequence["tokens"] == 20).all() and (ds.per_sequence["pairs"] == 2).all()
    for i in (0, len(ds) // 3, len(ds) - 1):  # offsets carried across the blocks
        for g in ds.sequences([i])[0]:
            assert len(g.prefix) == 4 and [len(c) for c in g.candidates] == [3, 3] and list(g.labels) == [1, 0]
