"""Private memory a rank holds for an open built dataset, against the size of its index files.

    python benchmarks/dataset_memory.py [--groups 4000000] [--shards 8] [--groups-per-sequence 64]

Every rank of a training job opens the whole dataset (it plans the global batch order), so what the
reader keeps per rank is multiplied by the ranks of a node. engine/indexed_dataset.py reads a
sequence's index entries when it reads the sequence (positional reads; the page cache holds one
copy of what is read per node) and keeps only per-sequence counts in private memory. The baseline, measured in the same run on the same files, is the index read into
memory (what the reader did before: every index array, tens of bytes a group, once per rank).

Each row runs in a fresh process and reports its anonymous resident memory (RssAnon, Linux) after
opening the dataset and reading 2,000 random sequences, minus the same process's figure before.
Groups are short (a 2-token prefix and two 1-token candidates): the index is what is measured, not
the tokens.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from engine.shard_writer import ShardWriter  # noqa: E402

SEQ_LENGTH = 4096


def write_shards(root: str, groups: int, shards: int, groups_per_sequence: int) -> int:
    """Shards of `groups` short groups in all; returns the bytes of their .idx files."""
    per_shard = -(-groups // shards)
    for s in range(shards):
        g = min(per_shard, groups - s * per_shard)
        n_seq = -(-g // groups_per_sequence)
        seq_groups = np.full(n_seq, groups_per_sequence, np.int64)
        seq_groups[-1] = g - groups_per_sequence * (n_seq - 1)
        w = ShardWriter(os.path.join(root, f"part-{s:05d}-of-{shards:05d}"), SEQ_LENGTH, 32000, 0)
        w.add_sequences(tokens=np.ones(4 * g, np.int64), piece_lengths=np.tile([2, 1, 1], g),
                        piece_labels=np.tile(np.array([-1, 1, 0], np.int8), g),
                        group_pieces=np.full(g, 3, np.int64), seq_groups=seq_groups,
                        sources=np.arange(g, dtype=np.int64))
        w.close()
    return sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root) if f.endswith(".idx"))


# Run in a fresh process so that one row's freed memory does not hide the next one's.
PROBE = """
import ctypes, gc, json, sys
import numpy as np
sys.path.insert(0, {root!r})
from engine.indexed_dataset import IndexedDataset

def rss_anon():
    # glibc keeps freed heap memory (the transient per-group arrays of the open) for reuse; what the
    # dataset holds is what is left once it is handed back
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

path, mode = {path!r}, {mode!r}
gc.collect()
before = rss_anon()
if mode == "read into memory":
    from pathlib import Path
    held = [np.fromfile(p, dtype=np.uint8) for p in sorted(Path(path).glob("*.idx"))]
    ds = IndexedDataset(path)
else:
    ds = IndexedDataset(path)
order = np.random.default_rng(0).integers(0, len(ds), size=2000)
for i in order:
    ds.sequences([int(i)])
gc.collect()
print(json.dumps({{"held": rss_anon() - before, "sequences": len(ds), "groups": ds.num_groups}}))
"""


def measure(path: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT, path=path, mode=mode)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def shard_arguments(ap: argparse.ArgumentParser, groups: int) -> None:
    """The options of write_shards (`groups` the default group count)."""
    ap.add_argument("--groups", type=at_least(1), default=groups,
                    help="groups in the built dataset (default %(default)s)")
    ap.add_argument("--shards", type=at_least(1), default=8,
                    help="shards the groups are split over (default %(default)s)")
    ap.add_argument("--groups-per-sequence", type=at_least(1), default=64,
                    help=f"at most {SEQ_LENGTH // 4} (4 tokens a group in {SEQ_LENGTH}-token sequences)")


def written_shards(ap: argparse.ArgumentParser, args, root: str) -> int:
    """The shards shard_arguments' options ask for, written to `root` (refused with a usage error
    where they cannot be), and a line saying what they are."""
    if args.groups_per_sequence > SEQ_LENGTH // 4:
        ap.error(f"--groups-per-sequence must be at most {SEQ_LENGTH // 4}: a group here is 4 tokens")
    if args.shards > args.groups:
        ap.error("--shards must be at most --groups (a shard holds at least one group)")
    idx_bytes = write_shards(root, args.groups, args.shards, args.groups_per_sequence)
    print(f"{args.groups:,} groups in {args.shards} shards, .idx files {idx_bytes / 2**20:.1f} MiB\n")
    return idx_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shard_arguments(ap, 4_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="polar_dsmem_") as root:
        idx_bytes = written_shards(ap, args, root)
        print("| reader | sequences | private memory held (MiB) | per group (bytes) | vs index size |")
        print("|---|---:|---:|---:|---:|")
        for mode in ("read into memory", "positional reads (engine)"):
            r = measure(root, mode)
            print(f"| {mode} | {r['sequences']:,} | {r['held'] / 2**20:.1f} | {r['held'] / r['groups']:.1f} | "
                  f"{r['held'] / idx_bytes:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
