"""Packing speed and efficiency: engine._C against plain Python, on POLAR-like group lengths.

    python benchmarks/packer.py [--groups 100000] [--capacity 16384] [--python-groups N]

Lengths are log-normal (median ~1.3k tokens, long tail clipped at 12k), roughly a prompt twice plus
a reference and K candidates after POLAR's truncation. Efficiency = real tokens / (sequences *
capacity). Only ratios mean anything across machines: this is single-threaded CPU code.

Two tables. The first is the language's speed-up: each C++ packer against Python running the same
algorithm on the same groups (the same packing, checked sequence by sequence): next-fit (the tests'
reference) and best-fit decreasing (open sequences in a list kept sorted by (room left, id), found
with bisect, as the C++ keeps them in a std::set). The second sets both C++ packers against the
naive Python first-fit that one writes first: algorithm and language together, and at a stated
number of groups only, since first-fit scans the open sequences for each group (O(groups x
sequences)), so its rate falls as the input grows and the ratio rises with it. It takes about a
minute at 100k groups; --python-groups runs that table on a prefix.
"""
import argparse
import bisect
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.arguments import at_least  # noqa: E402
from engine import _C  # noqa: E402
from tests.csrc.test_packer import ref_next_fit  # noqa: E402  (the tests' reference, timed as-is)


def polar_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(1300), 0.85, n), 32, 12000).astype(np.int64)


def python_first_fit(lengths, capacity):
    """The packer one writes first: each group into the first sequence with room, in arrival order."""
    remaining, bins = [], []
    for n in lengths:
        for b, r in enumerate(remaining):
            if r >= n:
                remaining[b] = r - n
                bins.append(b)
                break
        else:
            bins.append(len(remaining))
            remaining.append(capacity - n)
    return bins


def python_best_fit(lengths, capacity):
    """engine._C.pack_best_fit's algorithm in Python: longest group first (index breaks ties), each
    into the fullest open sequence with room (the oldest among equally full), a full one dropped."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    open_seqs, bins, count = [], [0] * len(lengths), 0  # open_seqs: sorted (room left, id)
    for g in order:
        n = lengths[g]
        at = bisect.bisect_left(open_seqs, (n, 0))
        if at == len(open_seqs):
            b, room = count, capacity - n
            count += 1
        else:
            room, b = open_seqs.pop(at)
            room -= n
        bins[g] = b
        if room > 0:
            bisect.insort(open_seqs, (room, b))
    return bins


def timed(fn, *args, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return np.asarray(out, dtype=np.int64), best


def packing(lengths: np.ndarray, bins: np.ndarray, capacity: int) -> tuple[int, float]:
    sequences = int(bins.max()) + 1
    return sequences, lengths.sum() / (sequences * capacity)


def same_algorithm_table(lengths: np.ndarray, cap: int) -> None:
    as_list = lengths.tolist()
    print("Same algorithm, same groups (the language's speed-up; the packings checked equal):\n")
    print("| algorithm | groups | Python groups/s | C++ groups/s | C++ / Python | sequences | efficiency |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, python, cpp in (("next-fit (order kept)", ref_next_fit, _C.pack_first_fit_ordered),
                              ("best-fit decreasing", python_best_fit, _C.pack_best_fit)):
        py_bins, py_s = timed(python, as_list, cap, repeat=3)
        c_bins, c_s = timed(cpp, lengths, cap, repeat=5)
        if not np.array_equal(py_bins, c_bins):
            raise AssertionError(f"{name}: the Python and C++ packings differ, so they are not the same algorithm")
        sequences, efficiency = packing(lengths, c_bins, cap)
        n = len(lengths)
        print(f"| {name} | {n} | {n / py_s:.3g} | {n / c_s:.3g} | {py_s / c_s:.1f}x | {sequences} | "
              f"{efficiency:.2%} |")


def first_fit_table(lengths: np.ndarray, cap: int) -> None:
    n = len(lengths)
    print(f"\nAgainst the naive Python first-fit at {n} groups (algorithm and language together; first-fit "
          f"is O(groups x sequences), so this ratio holds at {n} groups only):\n")
    print(f"| packer | groups | groups/s | vs Python first-fit at {n} groups | sequences | efficiency |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [("Python first-fit (baseline)", *timed(python_first_fit, lengths.tolist(), cap)),
            ("C++ next-fit (order kept)", *timed(_C.pack_first_fit_ordered, lengths, cap, repeat=5)),
            ("C++ best-fit decreasing", *timed(_C.pack_best_fit, lengths, cap, repeat=5))]
    base_s = rows[0][2]
    for name, bins, seconds in rows:
        sequences, efficiency = packing(lengths, bins, cap)
        print(f"| {name} | {n} | {n / seconds:.3g} | {base_s / seconds:.0f}x | {sequences} | {efficiency:.2%} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=at_least(1), default=100_000, help="groups packed (default %(default)s)")
    ap.add_argument("--capacity", type=int, default=16384, help="tokens a packed sequence (default %(default)s)")
    ap.add_argument("--python-groups", type=at_least(0), default=0,
                    help="groups of the table against the Python first-fit (0 = all)")
    args = ap.parse_args()
    lengths = polar_like_lengths(args.groups)
    cap = args.capacity
    if cap < lengths.max():
        ap.error(f"--capacity {cap} is below the longest group ({lengths.max()} tokens; lengths run up to "
                 f"12000): groups are never split, so give at least {lengths.max()}")
    n_py = min(args.python_groups or args.groups, args.groups)
    print(f"{args.groups} groups, capacity {cap}; lengths mean {lengths.mean():.0f}, "
          f"p50 {np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}\n")
    same_algorithm_table(lengths, cap)
    first_fit_table(lengths[:n_py], cap)


if __name__ == "__main__":
    main()
