"""engine.indexed_dataset: what ShardWriter writes, IndexedDataset reads back, and the loader on it (what the
reader refuses: test_indexed_dataset_checks.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data import GlobalBatchLoader, PackedGroups
from engine.indexed_dataset import IndexedDataset
from engine.packing import Group
from engine.shard_writer import ShardWriter

SEQ = 64


def random_groups(seed: int, n: int, vocab: int = 300) -> list[Group]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 5))
        labels = (rng.random(k) < 0.5).astype(np.int8)
        labels[0], labels[1] = 1, 0
        out.append(Group(prefix=rng.integers(0, vocab, int(rng.integers(1, 20))),
                         candidates=[rng.integers(0, vocab, int(rng.integers(1, 9))) for _ in range(k)],
                         labels=rng.permutation(labels)))
    return out


def write(path, packed: PackedGroups, vocab: int = 300, sources: bool = True, **meta) -> None:
    w = ShardWriter(path, packed.seq_length, vocab_size=vocab, pad_id=1, meta={"note": "test", **meta})
    for s, plan in enumerate(packed.plan):
        w.add_sequence([packed.groups[g] for g in plan], [int(g) for g in plan] if sources else None)
    w.close()


def same_groups(a: list[list[Group]], b: list[list[Group]]) -> None:
    assert [len(s) for s in a] == [len(s) for s in b]
    for sa, sb in zip(a, b):
        for ga, gb in zip(sa, sb):
            np.testing.assert_array_equal(ga.prefix, gb.prefix)
            assert len(ga.candidates) == len(gb.candidates)
            for ca, cb in zip(ga.candidates, gb.candidates):
                np.testing.assert_array_equal(ca, cb)
            np.testing.assert_array_equal(ga.labels, gb.labels)


@pytest.fixture
def packed():
    return PackedGroups(random_groups(0, 120), SEQ)


def test_round_trip_matches_packed_groups(tmp_path, packed):
    write(tmp_path / "ds" / "part-0", packed)
    ds = IndexedDataset(tmp_path / "ds")
    assert len(ds) == len(packed) and ds.seq_length == SEQ
    same_groups(ds.sequences(range(len(ds))), packed.sequences(range(len(packed))))
    assert ds.per_sequence.keys() == packed.per_sequence.keys()
    for k in packed.per_sequence:
        np.testing.assert_array_equal(ds.per_sequence[k], packed.per_sequence[k], err_msg=k)
    assert ds.num_real_tokens == packed.num_real_tokens
    assert ds.packing_efficiency == pytest.approx(packed.packing_efficiency)
    np.testing.assert_array_equal(ds.sources(3), packed.plan[3])
    assert ds.meta["note"] == "test" and ds.meta["pad_id"] == 1 and ds.meta["vocab_size"] == 300
    assert ds.num_groups == 120 and ds.candidates_per_group.sum() == sum(len(g.candidates) for g in packed.groups)


def test_shards_read_as_their_concatenation_in_name_order(tmp_path):
    a, b = PackedGroups(random_groups(2, 40), SEQ), PackedGroups(random_groups(3, 50), SEQ)
    write(tmp_path / "b-second", b)  # written first, read second: name order decides
    write(tmp_path / "a-first", a)
    ds = IndexedDataset(tmp_path)
    assert len(ds) == len(a) + len(b)
    same_groups(ds.sequences(range(len(ds))), a.sequences(range(len(a))) + b.sequences(range(len(b))))
    np.testing.assert_array_equal(ds.per_sequence["pairs"],
                                  np.concatenate([a.per_sequence["pairs"], b.per_sequence["pairs"]]))
    with pytest.raises(IndexError):
        ds.sequences([len(ds)])


def _loader(ds, dp_rank=0, dp_size=1, consumed=0):
    ld = GlobalBatchLoader(ds, global_batch=4, micro_batch=1, dp_rank=dp_rank, dp_size=dp_size, seed=7, pad_id=1)
    ld.load_state_dict({"consumed_batches": consumed})
    return ld


def test_loader_sharding_and_resume_on_a_built_dataset(tmp_path, packed):
    """DP=1 sees, batch by batch, the union of what DP=2 ranks see; a loader restored at
    consumed_batches=n continues exactly where the uninterrupted one is (across epochs too)."""
    write(tmp_path / "ds", packed)
    ds = IndexedDataset(tmp_path / "ds")
    steps = 2 * (len(ds) // 4) + 3  # into the third epoch
    one, ranks = _loader(ds), [_loader(ds, r, 2) for r in range(2)]
    seen = []
    for _ in range(steps):
        full = one.next_microbatches()
        split = [mb for r in ranks for mb in r.next_microbatches()]
        assert len(full) == 4 and len(split) == 4
        for a, b in zip(full, split):
            assert a.tokens.equal(b.tokens) and a.layout.equal(b.layout) and a.labels.equal(b.labels)
        seen.append(np.concatenate([mb.tokens.numpy() for mb in full]))
        assert one.last_global == ranks[0].last_global == ranks[1].last_global
    n = 5
    resumed = _loader(ds, consumed=n)
    for step in range(n, steps):
        got = np.concatenate([mb.tokens.numpy() for mb in resumed.next_microbatches()])
        np.testing.assert_array_equal(got, seen[step], err_msg=f"step {step}")
    # every sequence once per epoch
    epoch = [one.global_batch_indices(b) for b in range(len(ds) // 4)]
    assert len(np.unique(np.concatenate(epoch))) == 4 * (len(ds) // 4)


def test_opening_a_shard_looks_at_each_of_its_files_once(tmp_path):
    """Every rank opens every shard (thousands of shards, hundreds of ranks, at POLAR's scale), and each open
    of a file and each look at a name (a stat) is a request to a shared file system's metadata server.
    Per shard: its .idx opened once (for the header, offsets and counts, and the reads after), looked at
    once more after the .bin (a rebuild putting its shard in place between them is refused), the .bin
    and the .json looked at once each. It opened the .idx twice (the header, then the reads), and
    looked at the .bin twice (is_file, then stat) and at the .json before opening it: six, now four."""
    for k in range(3):
        write(tmp_path / f"part-{k:05d}", PackedGroups(random_groups(k, 30), SEQ))
    script = f"""
import collections, json, os, sys
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from engine.indexed_dataset import IndexedDataset

looks, real_stat = collections.Counter(), os.stat
def stat(path, *args, **kwargs):
    if "part-" in os.fsdecode(path):
        looks["stat " + os.path.splitext(os.fsdecode(path))[1]] += 1
    return real_stat(path, *args, **kwargs)
def opened(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and "part-" in os.fsdecode(args[0]):
        looks["open " + os.path.splitext(os.fsdecode(args[0]))[1]] += 1
os.stat = stat
sys.addaudithook(opened)
IndexedDataset(sys.argv[1])
print(json.dumps(looks))
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == {"open .idx": 3, "stat .idx": 3, "stat .bin": 3, "open .json": 3}, out.stdout


def test_an_open_dataset_holds_no_index_in_private_memory(tmp_path):
    """Every rank opens the whole dataset: the index (tens of bytes a group) is read a sequence at a
    time, so the ranks of a node share one copy in the page cache; what a rank holds privately is
    per sequence. The reader that read the index into memory held 1.04x the index here."""
    groups, per_seq = 1_000_000, 64
    w = ShardWriter(tmp_path / "big", 4096, vocab_size=300, pad_id=1)
    w.add_sequences(tokens=np.ones(4 * groups, np.int64), piece_lengths=np.tile([2, 1, 1], groups),
                    piece_labels=np.tile(np.array([-1, 1, 0], np.int8), groups),
                    group_pieces=np.full(groups, 3, np.int64), seq_groups=np.full(groups // per_seq, per_seq))
    w.close()
    idx_bytes = (tmp_path / "big.idx").stat().st_size
    script = f"""
import ctypes, gc, sys
import numpy as np
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from engine.indexed_dataset import IndexedDataset

def rss_anon():
    # glibc keeps freed heap memory (the transient per-group arrays of the open) for reuse; what the
    # dataset holds is what is left once it is handed back
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

gc.collect()
before = rss_anon()
ds = IndexedDataset({str(tmp_path)!r})
seqs = ds.sequences(np.random.default_rng(0).integers(0, len(ds), size=500))
assert ds.num_groups == {groups} and all(len(s) == {per_seq} for s in seqs)
del seqs
gc.collect()
print(rss_anon() - before)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    held = int(proc.stdout)
    # per sequence: six int64 counts and an offset, ~1 MB here against a 41 MB index
    assert held < 0.1 * idx_bytes, f"{held / 2**20:.1f} MiB held privately for a {idx_bytes / 2**20:.1f} MiB index"


def test_per_sequence_counts_are_as_narrow_as_they_fit_and_sum_exactly(tmp_path, packed):
    from engine.indexed_dataset import _narrow

    write(tmp_path / "s", packed)
    ds = IndexedDataset(tmp_path / "s")
    assert all(v.dtype == np.int16 for v in ds.per_sequence.values())  # 64-token packs
    for k, v in ds.per_sequence.items():
        np.testing.assert_array_equal(v, packed.per_sequence[k], err_msg=k)
    assert _narrow(np.array([2**15], np.int64)).dtype == np.int32
    assert _narrow(np.array([2**31], np.int64)).dtype == np.int64  # e.g. the attention pairs of 64k packs
    for t in (np.int16, np.int32):
        top = _narrow(np.full(4, np.iinfo(t).max, np.int64))
        assert top.dtype == t and int(top.sum()) == 4 * int(np.iinfo(t).max)  # a batch's sum does not wrap
        assert (top.sum() + np.int64(1)).dtype == np.int64  # stays an integer next to int64


def test_a_column_takes_the_widest_type_of_its_shards(tmp_path):
    """A shard of short groups (int16 attention pairs) between two of a long one (int32)."""
    short = PackedGroups(random_groups(1, 3), 512)
    long = PackedGroups([Group(prefix=np.ones(300, np.int64), candidates=[np.ones(100, np.int64)] * 2,
                               labels=[1, 0])], 512)
    for name, packed in (("a", long), ("b", short), ("c", long)):
        write(tmp_path / "ds" / name, packed)
    alone = [IndexedDataset(tmp_path / "ds" / n).per_sequence["attention_pairs"] for n in "abc"]
    assert [c.dtype for c in alone] == [np.int32, np.int16, np.int32]
    merged = IndexedDataset(tmp_path / "ds").per_sequence["attention_pairs"]
    assert merged.dtype == np.int32
    np.testing.assert_array_equal(merged, np.concatenate([long.per_sequence["attention_pairs"],
                                                          short.per_sequence["attention_pairs"],
                                                          long.per_sequence["attention_pairs"]]))


def test_version_1_shards_read_as_version_2_ones(tmp_path, packed):
    from benchmarks.dataset_open import as_version_1

    write(tmp_path / "v2", packed)
    write(tmp_path / "v1", packed)
    as_version_1(tmp_path / "v1.idx")
    a, b = IndexedDataset(tmp_path / "v2"), IndexedDataset(tmp_path / "v1")
    assert b.shards[0]._version == 1 and a.shards[0]._version == 2
    same_groups(a.sequences(range(len(a))), b.sequences(range(len(b))))
    for k in a.per_sequence:
        np.testing.assert_array_equal(a.per_sequence[k], b.per_sequence[k], err_msg=k)
    a.verify(), b.verify()


def test_a_big_endian_token_file_reads_the_same(tmp_path, packed):
    """A shard written on a big-endian machine names its byte order in the header."""
    write(tmp_path / "p", packed)
    b = tmp_path / "p.bin"
    b.write_bytes(np.fromfile(b, "<u2").astype(">u2").tobytes())
    with open(tmp_path / "p.idx", "r+b") as f:
        f.seek(16)
        f.write(b">u2".ljust(8, b"\0"))
    same_groups(IndexedDataset(tmp_path / "p").sequences(range(len(packed))), packed.sequences(range(len(packed))))
