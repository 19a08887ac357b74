"""Random reads of packed sequences whose index is not in the page cache: positional reads of a
sequence's index entries (the engine) against slicing them out of a memory map of the index.

    python benchmarks/dataset_cold_index.py [--groups 4000000] [--groups-per-sequence 64] [--reads 200]

At POLAR's scale (~10^9 groups, tens of bytes of index a group) the shards' indexes do not all stay
in the page cache either, so a shuffled epoch reads index entries from storage as well as tokens.
engine/indexed_dataset.py reads a sequence's entries with one positional read per index array,
exactly the elements it needs; the baseline, in the same run on the same file, is the same reader
(the same checks and token reads) slicing the entries out of a memory map of the .idx, as it did
before. A map's page fault reads around the faulting page (the block device's read-ahead,
`read_ahead_kb`), so each random sequence brings in more of the index than it uses.

One shard of `--groups` 4-token groups (a 2-token prefix, two 1-token candidates: the index is what
is measured), `--groups-per-sequence` to a packed sequence. Each row drops the index's pages from the
page cache (posix_fadvise DONTNEED; ext4 and xfs honour it; the small token file stays cached),
reads `--reads` random sequences, and reports the index bytes that came into the page cache
(mincore) against the index pages the reads touch, and the wall time; then the same reads again
with the pages cached (median of 7 passes, the readers' passes alternating).
"""
import argparse
import mmap
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.dataset_cold_read import engine_against_map, read_ahead_kb  # noqa: E402
from engine.indexed_dataset import IndexedDataset, SequenceIndex  # noqa: E402
from engine.shard_format import COUNTS  # noqa: E402
from engine.shard_writer import ShardWriter  # noqa: E402

SEQ_LENGTH = 4096


def write_shard(stem: str, groups: int, per_sequence: int) -> None:
    w = ShardWriter(stem, SEQ_LENGTH, vocab_size=300, pad_id=0)
    for start in range(0, groups, 1 << 20):
        n = min(1 << 20, groups - start)
        seqs = np.full(n // per_sequence, per_sequence, np.int64)
        if n % per_sequence:
            seqs = np.append(seqs, n % per_sequence)
        w.add_sequences(tokens=np.ones(4 * n, np.int64), piece_lengths=np.tile([2, 1, 1], n),
                        piece_labels=np.tile(np.array([-1, 1, 0], np.int8), n),
                        group_pieces=np.full(n, 3, np.int64), seq_groups=seqs)
    w.close()


def mapped_reader(ds: IndexedDataset):
    """The engine's reader with the previous index source: a sequence's entries sliced out of a
    memory map of the .idx (copied, as it did), then the same checks and token read."""
    shard = ds.shards[0]
    raw = np.memmap(shard._idx_path, dtype=np.uint8, mode="r").view(np.ndarray)
    sg, gpa, pta, _, pla = (raw[a:b].view(dt) for a, b, dt in shard._layout[:5])
    counts = [ds.per_sequence[k] for k in COUNTS]

    def read(j: int):
        g0, g1 = int(sg[j]), int(sg[j + 1])
        gp = np.array(gpa[g0:g1 + 1])
        p0, p1 = int(gp[0]), int(gp[-1])
        si = SequenceIndex(g0, g1, gp, np.array(pta[p0:p1 + 1]), np.array(pla[p0:p1]), j)
        shard.check_sequence(j, si, [c[j] for c in counts])
        return shard.read_groups(si)
    return read


def pages_touched(ds: IndexedDataset, order: np.ndarray) -> int:
    """Distinct index pages the reads of `order` need: each array's elements of each sequence."""
    shard, page = ds.shards[0], mmap.PAGESIZE
    raw = np.memmap(shard._idx_path, dtype=np.uint8, mode="r").view(np.ndarray)
    sg, gp = (raw[a:b].view(dt) for a, b, dt in shard._layout[:2])
    pages = set()
    for j in order.tolist():
        g0, g1 = int(sg[j]), int(sg[j + 1])
        p0, p1 = int(gp[g0]), int(gp[g1])
        for array, lo, hi in ((0, j, j + 2), (1, g0, g1 + 1), (2, p0, p1 + 1), (4, p0, p1)):
            begin, _, dtype = shard._layout[array]
            first, last = begin + lo * dtype.itemsize, begin + hi * dtype.itemsize - 1
            pages.update(range(first // page, last // page + 1))
    return len(pages) * page


def main():
    # the docstring's first paragraph: its first line alone stopped --help mid-sentence
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--groups", type=at_least(1), default=4_000_000,
                    help="groups in the built dataset (default %(default)s)")
    ap.add_argument("--groups-per-sequence", type=at_least(1), default=64,
                    help=f"at most {SEQ_LENGTH // 4} (4 tokens a group in {SEQ_LENGTH}-token sequences)")
    ap.add_argument("--reads", type=at_least(1), default=200,
                    help="random sequences read, page cache dropped first (default %(default)s)")
    args = ap.parse_args()
    if args.groups_per_sequence > SEQ_LENGTH // 4:
        ap.error(f"--groups-per-sequence must be at most {SEQ_LENGTH // 4}: a group here is 4 tokens")
    with tempfile.TemporaryDirectory(prefix="polar_coldindex_", dir=os.environ.get("TMPDIR")) as tmp:
        stem = os.path.join(tmp, "part")
        write_shard(stem, args.groups, args.groups_per_sequence)
        idx_path = stem + ".idx"
        ds = IndexedDataset(stem)
        order = np.random.default_rng(1).integers(0, len(ds), size=args.reads)
        touched, size = pages_touched(ds, order), os.path.getsize(idx_path)
        print(f"index {size / 2**20:.0f} MiB ({args.groups:,} groups, {len(ds):,} sequences of "
              f"{args.groups_per_sequence}), {args.reads} random sequences (their entries span "
              f"{touched / 2**20:.2f} MiB of pages); read_ahead_kb {read_ahead_kb(idx_path)}\n")
        engine_against_map(ds, mapped_reader, idx_path, order, touched, "index entries", "the pages used")


if __name__ == "__main__":
    main()
