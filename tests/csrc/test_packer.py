"""engine._C packers against plain-Python references (benchmarks/packer.py times the same references)."""
import threading

import numpy as np
import pytest

try:
    from engine import _C
except ImportError as exc:  # a clear failure, not a skip: a missing build is a broken install
    raise ImportError("engine._C is not built; run `pip install -e .` in the repository root") from exc


def ref_best_fit(lengths, capacity):
    """Best-fit decreasing, written the obvious O(n * bins) way with the packer's tie-breaking."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    remaining = []  # per sequence id
    bins = [0] * len(lengths)
    for g in order:
        best = None
        for b, r in enumerate(remaining):
            if r >= lengths[g] and (best is None or r < remaining[best]):
                best = b
        if best is None:
            best = len(remaining)
            remaining.append(capacity)
        remaining[best] -= lengths[g]
        bins[g] = best
    return bins


def ref_next_fit(lengths, capacity):
    bins, b, remaining = [], -1, 0
    for n in lengths:
        if n > remaining:
            b, remaining = b + 1, capacity
        remaining -= n
        bins.append(b)
    return bins


def check_valid_packing(lengths, bins, capacity):
    lengths, bins = np.asarray(lengths), np.asarray(bins)
    assert bins.shape == lengths.shape and bins.dtype == np.int64
    m = int(bins.max()) + 1
    assert set(bins.tolist()) == set(range(m))  # every id used, each group in exactly one
    assert (np.bincount(bins, weights=lengths, minlength=m) <= capacity).all()


def test_small_example_by_hand():
    lengths = np.array([5, 3, 7, 2, 4], dtype=np.int64)
    # 7 -> s0 (3 left); 5 -> s1 (5 left); 4 -> s1 (1 left); 3 -> s0, exactly full; 2 fits nowhere -> s2
    assert _C.pack_best_fit(lengths, 10).tolist() == [1, 0, 0, 2, 1]
    assert _C.pack_first_fit_ordered(lengths, 10).tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("seed", range(6))
def test_matches_python_reference(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.choice([16, 100, 4096]))
    n = int(rng.integers(1, 400))
    # Few distinct values force many ties in both the sort and the choice between equally full sequences.
    high = capacity if seed % 2 else max(2, capacity // 4)
    lengths = rng.integers(1, high + 1, size=n).astype(np.int64)
    best = _C.pack_best_fit(lengths, capacity)
    assert best.tolist() == ref_best_fit(lengths.tolist(), capacity)
    check_valid_packing(lengths, best, capacity)
    ordered = _C.pack_first_fit_ordered(lengths, capacity)
    assert ordered.tolist() == ref_next_fit(lengths.tolist(), capacity)
    check_valid_packing(lengths, ordered, capacity)
    assert (np.diff(ordered) >= 0).all()


def test_sequences_numbered_in_order_of_creation():
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 50, size=300).astype(np.int64)
    bins = _C.pack_best_fit(lengths, 64)
    in_processing_order = bins[np.lexsort((np.arange(len(lengths)), -lengths))]
    first_seen = np.unique(in_processing_order, return_index=True)[1]
    assert (np.diff(first_seen) > 0).all()


def test_exact_fill_and_deterministic():
    lengths = np.array([8, 2, 6, 4, 5, 5, 10], dtype=np.int64)
    bins = _C.pack_best_fit(lengths, 10)
    assert np.bincount(bins, weights=lengths).tolist() == [10.0, 10.0, 10.0, 10.0]
    # 10 -> s0; 8 -> s1; 6 -> s2; 5 -> s3; 5 -> s3 (full); 4 -> s2 (full); 2 -> s1 (full)
    assert bins.tolist() == [1, 1, 2, 2, 3, 3, 0]
    for _ in range(3):
        assert _C.pack_best_fit(lengths.copy(), 10).tolist() == bins.tolist()


def test_empty_input():
    empty = np.zeros(0, dtype=np.int64)
    assert _C.pack_best_fit(empty, 8).shape == (0,)
    assert _C.pack_first_fit_ordered(empty, 8).shape == (0,)


@pytest.mark.parametrize("fn", [_C.pack_best_fit, _C.pack_first_fit_ordered])
def test_oversize_and_empty_groups_are_named(fn):
    lengths = np.array([10, 20, 16385, 3], dtype=np.int64)
    with pytest.raises(ValueError, match=r"group 2 has length 16385.*pack length.*16384.*data\.seq_length"):
        fn(lengths, 16384)
    with pytest.raises(ValueError, match=r"group 1 has length 0"):
        fn(np.array([4, 0, 5], dtype=np.int64), 16)
    with pytest.raises(ValueError, match=r"group 0 has length -3"):
        fn(np.array([-3], dtype=np.int64), 16)
    with pytest.raises(ValueError, match=r"capacity.*must be positive"):
        fn(np.array([1], dtype=np.int64), 0)


@pytest.mark.parametrize("fn", [_C.pack_best_fit, _C.pack_first_fit_ordered])
def test_input_checks(fn):
    with pytest.raises(TypeError, match="dtype int64.*got int32"):
        fn(np.array([1, 2], dtype=np.int32), 8)
    with pytest.raises(TypeError, match="numpy array"):
        fn([1, 2], 8)
    with pytest.raises(ValueError, match="1-D"):
        fn(np.ones((2, 2), dtype=np.int64), 8)
    with pytest.raises(ValueError, match="contiguous"):
        fn(np.arange(1, 9, dtype=np.int64)[::2], 8)


@pytest.mark.parametrize("fn", [_C.pack_best_fit, _C.pack_first_fit_ordered])
def test_every_int64_dtype_is_taken_and_a_foreign_byte_order_refused(fn):
    """np.longlong ('q') is int64 on Linux but another dtype object than np.int64 ('l'); the check
    compared the objects and refused it as "must have dtype int64, got int64"."""
    lengths = np.array([5, 3, 7, 2, 4], dtype=np.int64)
    np.testing.assert_array_equal(fn(lengths.astype(np.longlong), 8), fn(lengths, 8))
    with pytest.raises(TypeError, match="dtype int64.*got >i8"):  # the kernels read native integers
        fn(lengths.astype(">i8"), 8)


def test_threads_get_independent_results():
    # The packers run without the GIL; concurrent calls on shared input must not interfere.
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 3000, size=20000).astype(np.int64)
    expected = _C.pack_best_fit(lengths, 4096)
    results = [None] * 4

    def work(i):
        results[i] = _C.pack_best_fit(lengths, 4096)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, expected)
