"""IndexedDataset.verify and the passes over every shard's whole index: progress, worker
processes, and a shard checked a run of sequences at a time."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data import PackedGroups
from engine.indexed_dataset import IndexedDataset
from engine.shard_format import DatasetFormatError
from engine.shard_writer import ShardWriter
from tests.engine.test_indexed_dataset import SEQ, random_groups, write
from tests.engine.test_indexed_dataset_checks import poke, write_counts


@pytest.fixture
def packed():
    return PackedGroups(random_groups(0, 120), SEQ)


def test_verify_reports_progress_between_shards(tmp_path):
    sizes = [40, 50, 30]
    for k, n in enumerate(sizes):
        write(tmp_path / f"s-{k}", PackedGroups(random_groups(200 + k, n), SEQ))
    ds = IndexedDataset(tmp_path)
    lines = []
    ds.verify(log=lines.append, every_s=0)
    assert [line.split(": ", 1)[1].split(" (")[0] for line in lines] == [
        "checked 1/3 shards, 40/120 groups", "checked 2/3 shards, 90/120 groups"]
    assert all("groups/s, ETA " in line for line in lines)
    ds.verify(log=lines.append, every_s=3600)
    assert len(lines) == 2


def test_a_pass_over_the_shards_in_worker_processes_keeps_their_order(tmp_path):
    sizes = [40, 50, 30]
    for k, n in enumerate(sizes):
        write(tmp_path / f"s-{k}", PackedGroups(random_groups(400 + k, n), SEQ))
    ds = IndexedDataset(tmp_path)
    assert ds.over_shards(len, workers=2) == ds.over_shards(len, workers=1) == [len(s) for s in ds.shards]
    ds.verify(workers=2)
    write(tmp_path / "s-1", PackedGroups(random_groups(0, 50), SEQ))  # rebuilt under the open dataset
    with pytest.raises(DatasetFormatError, match=r"s-1\.idx: replaced or rewritten since the dataset was opened"):
        ds.verify(workers=2)


def test_a_script_that_starts_the_pass_on_import_is_told_so(tmp_path):
    """Spawned workers import the calling script again: one without a __main__ guard would start
    the pass in each worker, which multiprocessing refuses; the error says what to do, no hang."""
    for k in range(2):
        write(tmp_path / f"s-{k}", PackedGroups(random_groups(500 + k, 20), SEQ))
    script = tmp_path / "unguarded.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
                      f"from engine.indexed_dataset import IndexedDataset\n"
                      f"IndexedDataset({str(tmp_path)!r}).verify(workers=2)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'put it under `if __name__ == "__main__":`' in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("version", [2, 1])
def test_an_index_replaced_alone_is_named_as_replaced_by_a_worker_too(tmp_path, version):
    """A worker reopening a shard whose .idx was replaced (a rebuild caught half-way: its .bin not
    yet) is told so before it reads the new file as the shard: read, it disagreed with the old .bin
    ("truncated or corrupt") or, in version 1, was checked whole first."""
    from benchmarks.dataset_open import as_version_1

    for k in range(2):
        write(tmp_path / "ds" / f"s-{k}", PackedGroups(random_groups(600 + k, 30), SEQ))
    write(tmp_path / "other", PackedGroups(random_groups(7, 45), SEQ))
    if version == 1:
        for stem in (tmp_path / "ds" / "s-0", tmp_path / "ds" / "s-1", tmp_path / "other"):
            as_version_1(stem.with_suffix(".idx"))
    ds = IndexedDataset(tmp_path / "ds")
    (tmp_path / "ds" / "s-1.idx").write_bytes((tmp_path / "other.idx").read_bytes())
    for workers in (1, 2):
        with pytest.raises(DatasetFormatError, match=r"s-1\.idx: replaced or rewritten since the dataset was opened"):
            ds.verify(workers=workers)


def test_auto_workers_count_the_cores_this_process_may_use(monkeypatch):
    """A job given 4 cores of a 128-core node (Slurm, taskset, a container's cpuset) sees 128 in
    os.cpu_count(): 32 workers there would share 4 cores, each holding its shard's arrays."""
    from engine import indexed_dataset

    monkeypatch.setattr(indexed_dataset.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(indexed_dataset.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert indexed_dataset.auto_workers(10**9) == 4 and indexed_dataset.auto_workers(10**6) == 1
    monkeypatch.delattr(indexed_dataset.os, "sched_getaffinity")  # macOS, Windows
    assert indexed_dataset.auto_workers(10**9) == 32


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_verify_in_chunks_finds_a_damage_anywhere_and_names_its_sequence(tmp_path, packed, monkeypatch, chunk):
    from engine import indexed_dataset

    monkeypatch.setattr(indexed_dataset, "CHUNK_GROUPS", chunk)
    write(tmp_path / "p", packed)
    IndexedDataset(tmp_path / "p").verify()
    last = len(packed) - 1  # in the last chunk, whatever its size
    cols = {k: np.array(v, np.int64) for k, v in packed.per_sequence.items()}
    cols["pairs"][last] += 1
    write_counts(tmp_path / "p", cols)
    with pytest.raises(DatasetFormatError, match=rf"p\.idx: packed sequence {last}: its pairs count is"):
        IndexedDataset(tmp_path / "p").verify()
    write(tmp_path / "q", packed)
    # the first group offset of the last sequence: shared by the last two chunks when chunks are small
    g = sum(len(p) for p in packed.plan[:last])
    poke(tmp_path / "q", 1, g, 10**6)
    with pytest.raises(DatasetFormatError, match=r"q\.idx: group offsets do not run from 0 to"):
        IndexedDataset(tmp_path / "q").verify()


def test_statistics_do_not_depend_on_the_chunks(tmp_path, monkeypatch):
    from engine import indexed_dataset
    from polar import data_stats

    for k in range(2):
        write(tmp_path / f"s-{k}", PackedGroups(random_groups(600 + k, 70), SEQ))
    whole = data_stats.compute(str(tmp_path), workers=1)
    monkeypatch.setattr(indexed_dataset, "CHUNK_GROUPS", 5)
    assert data_stats.compute(str(tmp_path), workers=1) == whole


def test_verify_takes_memory_by_the_chunk_not_by_the_shard(tmp_path):
    """A shard of 2^20 groups checked 2^16 groups at a time: the arrays verify holds at once follow
    the chunk (the whole-shard check held ~150 bytes a group, 158 MiB here)."""
    groups = 1 << 20
    w = ShardWriter(tmp_path / "big", 4096, vocab_size=300, pad_id=1)
    w.add_sequences(tokens=np.ones(4 * groups, np.int64), piece_lengths=np.tile([2, 1, 1], groups),
                    piece_labels=np.tile(np.array([-1, 1, 0], np.int8), groups),
                    group_pieces=np.full(groups, 3, np.int64), seq_groups=np.full(groups // 64, 64))
    w.close()
    script = f"""
import sys, tracemalloc
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from engine import indexed_dataset
indexed_dataset.CHUNK_GROUPS = 1 << 16
ds = indexed_dataset.IndexedDataset({str(tmp_path / "big")!r})
tracemalloc.start()
ds.verify(workers=1)
print(tracemalloc.get_traced_memory()[1])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout)
    assert peak < 16 * 2**20, f"{peak / 2**20:.1f} MiB held at once"
