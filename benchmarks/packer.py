"""Packing speed and efficiency: engine._C against plain Python, on POLAR-like group lengths.

    python benchmarks/packer.py [--groups 100000] [--capacity 16384] [--python-groups N]

Lengths are log-normal (median ~1.3k tokens, long tail clipped at 12k), roughly a prompt twice plus
a reference and K candidates after POLAR's truncation. Efficiency = real tokens / (sequences *
capacity). Only ratios mean anything across machines: this is single-threaded CPU code.
The naive Python first-fit is quadratic in the number of sequences (about a minute at 100k groups);
--python-groups runs it on a prefix to save time, and its row then says how many groups it saw.
"""
import argparse
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


def timed(fn, *args, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return np.asarray(out, dtype=np.int64), best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=at_least(1), default=100_000)
    ap.add_argument("--capacity", type=int, default=16384)
    ap.add_argument("--python-groups", type=at_least(0), default=0, help="groups for the Python first-fit (0 = all)")
    args = ap.parse_args()
    lengths = polar_like_lengths(args.groups)
    cap = args.capacity
    if cap < lengths.max():
        ap.error(f"--capacity {cap} is below the longest group ({lengths.max()} tokens; lengths run up to "
                 f"12000): groups are never split, so give at least {lengths.max()}")
    n_py = min(args.python_groups or args.groups, args.groups)
    print(f"{args.groups} groups, capacity {cap}; lengths mean {lengths.mean():.0f}, "
          f"p50 {np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}")

    as_list = lengths.tolist()
    rows = [
        ("python first-fit (baseline)", *timed(python_first_fit, as_list[:n_py], cap), n_py),
        ("python next-fit (test ref)", *timed(ref_next_fit, as_list, cap, repeat=3), args.groups),
        ("C++ next-fit ordered", *timed(_C.pack_first_fit_ordered, lengths, cap, repeat=5), args.groups),
        ("C++ best-fit decreasing", *timed(_C.pack_best_fit, lengths, cap, repeat=5), args.groups),
    ]
    base_rate = n_py / rows[0][2]
    print(f"| {'packer':<28} | {'groups':>7} | {'groups/s':>10} | {'vs baseline':>11} | {'sequences':>9} | {'efficiency':>10} |")
    print("|" + "|".join(["-" * 30] + ["-" * (w + 1) + ":" for w in (7, 10, 11, 9, 10)]) + "|")
    for name, bins, seconds, n in rows:
        sequences = int(bins.max()) + 1
        efficiency = lengths[:n].sum() / (sequences * cap)
        rate = n / seconds
        print(f"| {name:<28} | {n:>7} | {rate:>10.3g} | {rate / base_rate:>10.1f}x | {sequences:>9} | {efficiency:>10.2%} |")


if __name__ == "__main__":
    main()
