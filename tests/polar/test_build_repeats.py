import numpy as np
import pytest

from polar import build_repeats
from polar.build_repeats import SHOWN, Repeats, first_of, named
from polar.finetune_split import where
from polar.records import Record


def test_the_first_few_are_joined_and_a_tail_says_more_were_not_shown():
    assert first_of([], 0) == ""
    assert first_of(["a"], 1) == "a"
    assert first_of(iter(["a", "b"]), 2) == "a, b"  # any iterable: the callers pass generators
    assert first_of(["a", "b"], 5) == "a, b, ..."
    assert named(2, [("x:2", "x:1"), ("x:4", "x:3")]) == "x:2 repeats x:1, x:4 repeats x:3"
    assert named(3, [("x:2", "x:1")]) == "x:2 repeats x:1, ..."


def test_where_names_the_first_records_by_file_and_line():
    records = [Record("p", "r", ["c", "d"], [1, 0], None, file="f.jsonl", line=i) for i in range(1, SHOWN + 2)]
    assert where(records[:SHOWN]) == ", ".join(f"f.jsonl:{i}" for i in range(1, SHOWN + 1))
    assert where(records) == where(records[:SHOWN]) + ", ..."
    assert where(records, limit=1) == "f.jsonl:1, ..."
    assert where([]) == ""


def _expected(chunks, sources):
    """Repeats.find's answer from its definition: a record repeats the first record before it (in the order
    added) of its digest; the repeats of smallest id are named."""
    first, repeats = {}, []
    for ids, digests in chunks:
        for rid, d in zip(ids.tolist(), map(tuple, digests.tolist())):
            if d in first:
                repeats.append((rid, first[d]))
            else:
                first[d] = rid

    def where(rid):
        src = max((s for s in sources if s["first_record"] <= rid), key=lambda s: s["first_record"])
        return f"{src['path']}:{rid - src['first_record'] + 1}"

    return len(repeats), [[where(r), where(f)] for r, f in sorted(repeats)[:SHOWN]]


def _chunks(digests, ids, rng):
    cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=min(20, len(ids) - 1), replace=False))
    return list(zip(np.split(ids, cuts), np.split(digests, cuts)))


@pytest.mark.parametrize("case", ["random", "one_record_many_times", "digests_sharing_d0", "ids_not_rising",
                                  "no_repeat"])
def test_repeats_split_on_disk_are_those_of_one_sort(case, tmp_path, monkeypatch):
    """The rows go to disk and are split by digest bits until a part fits _BLOCK (small here, so that parts
    are split again, down to d1's bits, and a record repeated past _BLOCK times takes the one-digest path);
    the count and the repeats named are those of the definition."""
    monkeypatch.setattr(build_repeats, "_BLOCK", 16)
    rng = np.random.default_rng(7)
    n = 3000
    pool = rng.integers(0, 2 ** 64, size=(1200, 2), dtype=np.uint64)
    if case == "digests_sharing_d0":
        pool[:, 0] = pool[0, 0]
    digests = pool[rng.integers(0, len(pool), n)]
    if case == "one_record_many_times":
        digests[rng.random(n) < 0.3] = pool[5]
    if case == "no_repeat":
        digests = rng.integers(0, 2 ** 64, size=(n, 2), dtype=np.uint64)
    ids = np.arange(n, dtype=np.int64) * 2 + 10
    if case == "ids_not_rising":
        ids = rng.permutation(ids)
    chunks = _chunks(digests, ids, rng)
    sources = [{"path": "a.jsonl", "first_record": 10}, {"path": "b.jsonl", "first_record": 3000}]
    r = Repeats(tmp_path)
    for chunk_ids, chunk_digests in chunks:
        r.add(chunk_ids, chunk_digests)
    want = _expected(chunks, sources)
    assert (want[0] == 0) == (case == "no_repeat") and (case == "no_repeat" or len(want[1]) == SHOWN)
    assert r.find(sources) == want
    assert list(tmp_path.iterdir()) == []  # the spilled rows are gone with their files


def test_the_memory_held_for_repeats_does_not_grow_with_the_shard(tmp_path, monkeypatch):
    """Repeats held every group's id and digest (24 bytes) to the end of the build and sorted them all at once
    (2.4 GB held and as much again at the sort for 10^8 groups): now the rows wait on disk, and find sorts
    _BLOCK rows at a time."""
    import tracemalloc

    monkeypatch.setattr(build_repeats, "_BLOCK", 1 << 10)
    per, calls = 2000, 40  # 80,000 groups, a third of them repeats

    def chunks():  # made again for the expected answer, not kept beside the adds
        rng = np.random.default_rng(3)
        pool = rng.integers(0, 2 ** 64, size=(per * calls * 2 // 3, 2), dtype=np.uint64)
        for i in range(calls):
            yield np.arange(i * per, (i + 1) * per, dtype=np.int64), pool[rng.integers(0, len(pool), per)]

    r = Repeats(tmp_path)
    sources = [{"path": "a.jsonl", "first_record": 0}]
    tracemalloc.start()
    try:
        held = tracemalloc.get_traced_memory()[0]
        for ids, digests in chunks():
            r.add(ids, digests)
        del ids, digests
        held = tracemalloc.get_traced_memory()[0] - held
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        found = r.find(sources)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert held < 64 << 10 and peak < 512 << 10, (held, peak)  # were 1.9 MB and 2.6 MB
    assert found == _expected(list(chunks()), sources)
