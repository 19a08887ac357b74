"""What opening a built dataset costs a rank: wall time and index bytes read from storage, for
version-2 shards (per-sequence counts in the index) against the same shards as version 1.

    python benchmarks/dataset_open.py [--groups 4000000] [--shards 1] [--groups-per-sequence 4 16 64]

Every rank of a training job opens the whole dataset before its first step. A version-1 index
holds no per-sequence counts: the reader reads every group's and piece's offsets (about 44 bytes a
group), checks them and sums them per sequence. A version-2 index carries the counts, so an open
reads the sequence offsets and the counts only (56 bytes a packed sequence) and each sequence is
checked when it is read. The baseline is the same shards rewritten as version 1 (the counts cut
off), measured in the same run. The last column is what the version-2 reader pays instead: each
sequence read is checked (offsets, labels, counts recomputed), microseconds per random sequence
with the page cache warm (median of 7 passes, the two versions' passes alternating in one
process), against version 1's unchecked reads (its index was checked at open).

Each open runs in a fresh process after the shards' index pages are dropped from the page cache
(posix_fadvise DONTNEED; this only works where the file system honours it, ext4 and xfs do): the
time is a cold open, and "read" is the index pages the open brought into the page cache (mincore),
kernel read-ahead included (which reads a shard of a few MB whole: one shard by default, as a
production shard of 10^7-10^8 groups is far larger than the read-ahead). Groups are short (a
2-token prefix and two 1-token candidates): the index is what is measured.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.page_cache import cached_bytes, drop  # noqa: E402
from benchmarks.dataset_memory import SEQ_LENGTH, write_shards  # noqa: E402
from engine.indexed_dataset import _Shard  # noqa: E402
from engine.shard_files import OpenFiles  # noqa: E402

OPEN = """
import sys, time
sys.path.insert(0, {root!r})
from engine.indexed_dataset import IndexedDataset
t = time.perf_counter()
ds = IndexedDataset({path!r})
print(time.perf_counter() - t, len(ds), ds.num_groups)
"""

# Both versions in one process, their passes alternating: the machine's load drifts over seconds,
# and would otherwise land on one version's figure.
READS = """
import sys, time
import numpy as np
sys.path.insert(0, {root!r})
from engine.indexed_dataset import IndexedDataset
sets = [IndexedDataset(p) for p in {paths!r}]
order = np.random.default_rng(0).integers(0, len(sets[0]), size={reads})
for ds in sets:
    ds.sequences(order)  # the pages, warm for the timed passes
passes = [[] for _ in sets]
for _ in range(7):
    for ds, times in zip(sets, passes):
        t = time.perf_counter()
        ds.sequences(order)
        times.append((time.perf_counter() - t) / len(order))
print(*(float(np.median(times)) for times in passes))
"""


def as_version_1(idx_path) -> None:
    """Rewrites a version-2 shard index (`NAME.idx`) as version 1: the same index without its counts."""
    end = _Shard(Path(idx_path), OpenFiles())._layout[4][1]
    with open(idx_path, "r+b") as f:
        f.seek(8)
        f.write(np.array([1, 0], "<u4").tobytes())
        f.truncate(end)


def _indexes(root: str) -> list[str]:
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.endswith(".idx")]


def drop_cached(root: str) -> None:
    for path in _indexes(root):
        drop(path)


def cached(root: str) -> int:
    """Bytes of the shards' index files now in the page cache."""
    return sum(cached_bytes(p) for p in _indexes(root))


def measure_open(root: str) -> dict:
    drop_cached(root)
    before = cached(root)
    probe = subprocess.run([sys.executable, "-c", OPEN.format(root=ROOT, path=root)],
                           capture_output=True, text=True, check=True)
    seconds, sequences, groups = probe.stdout.split()
    return {"s": float(seconds), "sequences": int(sequences), "groups": int(groups),
            "read": cached(root) - before, "index": sum(os.path.getsize(p) for p in _indexes(root))}


def measure_reads(roots: list[str], reads: int) -> list[float]:
    """Microseconds per random sequence read from each of `roots` (page cache warm)."""
    out = subprocess.run([sys.executable, "-c", READS.format(root=ROOT, paths=roots, reads=reads)],
                         capture_output=True, text=True, check=True)
    return [1e6 * float(x) for x in out.stdout.split()]


def main():
    # the docstring's first paragraph: its first line alone stopped --help mid-sentence
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--groups", type=at_least(1), default=4_000_000,
                    help="groups in the built dataset (default %(default)s)")
    ap.add_argument("--shards", type=at_least(1), default=1,
                    help="shards the groups are split over; read-ahead (the block device's read_ahead_kb, "
                         "often 128 KB, 8 MB here) reads small shards whole")
    ap.add_argument("--groups-per-sequence", type=at_least(1), nargs="+", default=[4, 16, 64],
                    help="at most 1024 each (4 tokens a group in 4096-token sequences)")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="opens per row; the median is printed")
    ap.add_argument("--reads", type=at_least(1), default=2000,
                    help="random sequences read (page cache warm) for the read column")
    args = ap.parse_args()
    if max(args.groups_per_sequence) > SEQ_LENGTH // 4:
        ap.error(f"--groups-per-sequence must be at most {SEQ_LENGTH // 4}: a group here is 4 tokens")
    if args.shards > args.groups:
        ap.error("--shards must be at most --groups (a shard holds at least one group)")
    print(f"{args.groups:,} groups in {args.shards} shards; cold opens, median of {args.repeats}; "
          f"{args.reads:,} random reads x 7 passes\n")
    print("| groups/sequence | index | sequences | index size (MiB) | read at open (MiB) | open (s) | v1 / v2 open "
          "| random read (us/sequence) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for gps in args.groups_per_sequence:
        with tempfile.TemporaryDirectory(prefix="polar_dsopen_", dir=os.environ.get("TMPDIR")) as tmp:
            v2, v1 = os.path.join(tmp, "v2"), os.path.join(tmp, "v1")
            os.makedirs(v2)
            write_shards(v2, args.groups, args.shards, gps)
            shutil.copytree(v2, v1)
            for path in _indexes(v1):
                as_version_1(path)
            rows = {}
            for name, root in (("version 1", v1), ("version 2", v2)):
                runs = [measure_open(root) for _ in range(args.repeats)]
                r = runs[0]
                assert r["groups"] == args.groups, r
                r["s"] = float(np.median([x["s"] for x in runs]))
                r["read"] = float(np.median([x["read"] for x in runs]))
                rows[name] = r
            for r, us in zip(rows.values(), measure_reads([v1, v2], args.reads)):
                r["us_per_sequence"] = us
            for name, r in rows.items():
                ratio = rows["version 1"]["s"] / r["s"]
                print(f"| {gps} | {name} | {r['sequences']:,} | {r['index'] / 2**20:.1f} | {r['read'] / 2**20:.1f} | "
                      f"{r['s']:.3f} | {ratio:.1f}x | {r['us_per_sequence']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
