"""engine.shard_files: the open shard files of a dataset, bounded by the open-file limit, read from
any thread with positional reads, each closed exactly once."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data import PackedGroups
from engine.indexed_dataset import IndexedDataset
from engine.shard_format import DatasetFormatError
from tests.engine.test_indexed_dataset import SEQ, random_groups, same_groups, write


@pytest.fixture
def packed():
    return PackedGroups(random_groups(0, 120), SEQ)


def test_hundreds_of_shards_read_within_a_small_open_file_limit(tmp_path):
    """A shard holds no file descriptor while unread, and the memory maps of the .bin files are
    bounded: 300 shards read (and their groups kept) under a limit of 256 open files."""
    expected = 0
    for k in range(300):
        packed = PackedGroups(random_groups(k, 3), SEQ)
        write(tmp_path / f"s-{k:03d}", packed)
        expected += sum(int(p.sum()) for g in packed.groups for p in (g.prefix, *g.candidates))
    script = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
from engine.indexed_dataset import IndexedDataset
ds = IndexedDataset({str(tmp_path)!r})
kept = ds.sequences(range(len(ds))) + ds.sequences(range(len(ds) - 1, -1, -1))
print(len(ds.shards), sum(int(p.sum()) for seq in kept[:len(ds)] for g in seq for p in (g.prefix, *g.candidates)))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["300", str(expected)]


@pytest.mark.parametrize("limit,size", [(1024, 256), (40, 16)])
def test_the_open_files_follow_the_open_file_limit(limit, size):
    script = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from engine.shard_files import OpenFiles
print(OpenFiles().size)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) == size


def test_threads_reading_while_the_open_files_are_dropped_get_their_own_bytes(tmp_path):
    """Two loader threads read from 40 shards while at most 4 files stay open: a file dropped by one
    thread is still read by the other (a descriptor closed under a reader could be reused by the
    next file opened, and the read would return another shard's bytes)."""
    import threading

    expected = []
    for k in range(40):
        packed = PackedGroups(random_groups(100 + k, 6), SEQ)
        write(tmp_path / f"s-{k:02d}", packed)
        expected += packed.sequences(range(len(packed)))
    ds = IndexedDataset(tmp_path)
    ds._files.size = 4
    errors = []

    def reader(seed):
        try:
            order = np.random.default_rng(seed).integers(0, len(ds), size=400)
            for i in order:
                same_groups(ds.sequences([int(i)]), [expected[int(i)]])
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_without_preadv_tokens_are_read_with_pread(tmp_path, packed, monkeypatch):
    import os

    write(tmp_path / "p", packed)
    monkeypatch.delattr(os, "preadv")
    ds = IndexedDataset(tmp_path / "p")
    same_groups(ds.sequences(range(len(ds))), packed.sequences(range(len(packed))))


def test_a_token_file_refused_when_reopened_leaves_other_descriptors_open(tmp_path, packed):
    """A token file whose size changed since the dataset was opened is refused; its descriptor,
    closed then, is not closed again when the refused object goes (by then the number may be another
    file's, here a log's)."""
    import gc

    write(tmp_path / "p", packed)
    ds = IndexedDataset(tmp_path / "p")
    (tmp_path / "p.bin").write_bytes((tmp_path / "p.bin").read_bytes() + b"\0\0")
    errors = []
    try:
        ds.sequences([0])
    except DatasetFormatError as e:  # kept, as a loader thread's error is until the step raises it
        errors.append(e)
    assert errors and "p.bin: " in str(errors[0])
    with open(tmp_path / "log", "w") as log:
        errors.clear()
        gc.collect()
        log.write("step 1\n")
        log.flush()  # EBADF had its descriptor been closed under it
    assert (tmp_path / "log").read_text() == "step 1\n"


def test_a_file_whose_read_advice_fails_is_closed(tmp_path, packed, monkeypatch):
    """The read-ahead advice comes after the open: a failure there leaves no descriptor behind."""
    import os

    write(tmp_path / "p", packed)
    ds = IndexedDataset(tmp_path / "p")
    ds._files.size = 0  # every read opens its file again

    def refused(fd, offset, length, advice):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refused, raising=False)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(OSError):
            ds.sequences([0])
    assert len(os.listdir("/proc/self/fd")) == before
