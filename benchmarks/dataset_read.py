"""Random reads from a built dataset of many shards: the cost of bounding the open shard files.

    python benchmarks/dataset_read.py [--shards 8 300] [--reads 20000] [--seq-length 16384]

engine/indexed_dataset.py keeps a bounded number of shard files open (engine.shard_files: a quarter
of the open-file limit, 256 files under the common 1024; a shard's index .idx and its tokens .bin,
both read with positional reads), so a dataset of thousands of shards opened whole does not run
into the limit. This measures what that costs a loader reading packed sequences in random order
(what a shuffled epoch does): microseconds per sequence with at most 64 shards' files open (the
bound before it followed the limit) against a bound no smaller than the shard count (every file
kept open), in the same run on the same files. Shards are written with POLAR-like group lengths
(shared prefix 200-3000 tokens, 2 candidates of 100-2000) packed into `--seq-length` sequences,
about `--sequences` per shard (the packer may need a few more), int32 tokens; the page cache is
warm after the first pass, which is what a training run that rereads its data sees.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from engine.data import PackedGroups  # noqa: E402
from engine.indexed_dataset import IndexedDataset  # noqa: E402
from engine.shard_writer import ShardWriter  # noqa: E402
from engine.packing import Group  # noqa: E402


LONGEST_GROUP = 2999 + 2 * 1999  # write_shards' longest prefix and candidates


def write_shards(root: str, shards: int, sequences: int, seq_length: int) -> None:
    rng = np.random.default_rng(0)
    for s in range(shards):
        groups = []
        while sum(len(g) for g in groups) < sequences * seq_length * 0.95:
            prefix = rng.integers(1, 90000, size=int(rng.integers(200, 3000)), dtype=np.int32)
            cands = [rng.integers(1, 90000, size=int(rng.integers(100, 2000)), dtype=np.int32) for _ in range(2)]
            groups.append(Group(prefix=prefix, candidates=cands, labels=np.array([1, 0], dtype=np.int8)))
        packed = PackedGroups(groups, seq_length)
        w = ShardWriter(os.path.join(root, f"part-{s:05d}-of-{shards:05d}"), seq_length, 92544, 0)
        for plan in packed.plan:
            w.add_sequence([packed.groups[g] for g in plan])
        w.close()


def random_order(root: str, reads: int, seed: int = 1) -> np.ndarray:
    """`reads` sequence indexes drawn over the whole dataset. The packer may need more sequences than
    --sequences per shard, so the range is the dataset's length (shards * --sequences left the last
    shards unread, and fewer shards to open made the bound look cheaper)."""
    return np.random.default_rng(seed).integers(0, len(IndexedDataset(root)), size=reads)


def per_sequence_us(ds: IndexedDataset, order: np.ndarray) -> float:
    for i in range(len(ds)):  # warm the page cache (and, where they all fit, the open files)
        ds.sequences([i])
    t = time.perf_counter()
    for i in order:
        ds.sequences([int(i)])
    return (time.perf_counter() - t) / len(order) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=at_least(1), nargs="+", default=[8, 300],
                    help="shard counts, a row each (default %(default)s)")
    ap.add_argument("--sequences", type=at_least(1), default=4, help="packed sequences per shard")
    ap.add_argument("--seq-length", type=int, default=16384, help="tokens a packed sequence (default %(default)s)")
    ap.add_argument("--reads", type=at_least(1), default=20000, help="random sequence reads timed per row")
    args = ap.parse_args()
    if args.seq_length < LONGEST_GROUP:
        ap.error(f"--seq-length must be at least {LONGEST_GROUP}: the synthetic groups run up to that many "
                 "tokens and are never split across sequences")
    print("| shards | shards open at most | us per sequence (random order) | vs every file open |")
    print("|---:|---:|---:|---:|")
    for shards in args.shards:
        with tempfile.TemporaryDirectory(prefix="polar_dsread_") as root:
            write_shards(root, shards, args.sequences, args.seq_length)
            order = random_order(root, args.reads)
            rows = {}
            for bound in (shards + 1, 64) if shards > 64 else (shards + 1,):  # the baseline first: all open
                ds = IndexedDataset(root)
                ds._files.size = 2 * bound  # two files a shard
                rows[bound] = per_sequence_us(ds, order)
                del ds
            for bound, us in rows.items():
                label = "all" if bound > shards else str(bound)
                print(f"| {shards} | {label} | {us:.0f} | {us / rows[shards + 1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
