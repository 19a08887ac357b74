"""Random reads of packed sequences from storage (page cache cold): what the engine's positional
reads bring in, against reading the tokens through a memory map.

    python benchmarks/dataset_cold_read.py [--sequences 12000] [--seq-length 16384] [--reads 200]

POLAR's pre-training data (trillions of tokens) is far larger than a node's page cache, so a
shuffled epoch reads most packed sequences from storage. engine/indexed_dataset.py reads a
sequence's tokens with one positional read of exactly its bytes; the baseline, measured in the
same run on the same file, is the same reader (the same checks and groups) copying the span out of
a memory map of the token file (where the reader took its tokens before). A map's page fault reads
around the faulting page (the block device's read-ahead, `read_ahead_kb`: often 128 KB, several MB
on some machines and network file systems), so each random sequence brings in more than its own
bytes.

Each row drops the token file's pages from the page cache (posix_fadvise DONTNEED; ext4 and xfs
honour it), reads `--reads` random sequences, and reports the bytes that came into the page cache
(mincore), against the bytes the sequences hold, and the wall time; then the same reads again
with the pages cached (median of 7 passes, the two readers' passes alternating). The index's pages
are not dropped (written just before, they stay cached): the tokens are what is measured.
int16-sized tokens (vocabulary <= 65,536).
"""
import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.page_cache import cold_then_warm  # noqa: E402
from engine.indexed_dataset import IndexedDataset  # noqa: E402
from engine.shard_format import COUNTS  # noqa: E402
from engine.shard_writer import ShardWriter  # noqa: E402
from engine.packing import Group  # noqa: E402

GROUPS_PER_SEQUENCE = 4


def write_shard(stem: str, sequences: int, seq_length: int) -> None:
    """`sequences` full packed sequences of 4 groups (a prefix and two candidates each)."""
    g = seq_length // GROUPS_PER_SEQUENCE
    pieces = np.array([g - 2 * (g // 8), g // 8, g // 8], np.int64)
    w = ShardWriter(stem, seq_length, vocab_size=32000, pad_id=0)
    rng = np.random.default_rng(0)
    for start in range(0, sequences, 1000):
        n = min(1000, sequences - start)
        groups = n * GROUPS_PER_SEQUENCE
        w.add_sequences(tokens=rng.integers(0, 32000, int(pieces.sum()) * groups),
                        piece_lengths=np.tile(pieces, groups),
                        piece_labels=np.tile(np.array([-1, 1, 0], np.int8), groups),
                        group_pieces=np.full(groups, 3, np.int64), seq_groups=np.full(n, GROUPS_PER_SEQUENCE))
    w.close()


def read_ahead_kb(path: str) -> str:
    dev = os.stat(path).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/read_ahead_kb") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def mapped_reader(ds: IndexedDataset):
    """The engine's reader with the previous token source: the sequence's span copied out of a
    memory map of the .bin (the same index reads, checks and groups)."""
    shard = ds.shards[0]
    tokens = np.memmap(shard._bin_path, dtype=shard.dtype, mode="r")
    counts = [ds.per_sequence[k] for k in COUNTS]

    def read(j: int) -> list[Group]:
        si = shard.sequence_index(j)
        shard.check_sequence(j, si, [c[j] for c in counts])
        bounds = (si.piece_tokens - si.piece_tokens[0]).tolist()
        t0 = int(si.piece_tokens[0])
        span = tokens[t0:t0 + bounds[-1]].astype(np.int32)
        pieces = [span[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        firsts = (si.group_pieces - si.group_pieces[0]).tolist()
        return [Group.checked(pieces[a], pieces[a + 1:b], si.piece_label[a + 1:b])
                for a, b in zip(firsts[:-1], firsts[1:])]
    return read


def engine_against_map(ds: IndexedDataset, mapped_reader, path: str, order, used: int, first: str,
                       used_is: str) -> None:
    """cold_then_warm's table for the engine's reads of `ds` against `mapped_reader(ds)`'s."""
    ds.sequences([int(order[0])])  # opens the files, and anything else a first read sets up
    makers = {"positional reads (engine)": lambda: lambda j: ds.sequences([j]),
              "memory map (before)": lambda: mapped_reader(ds)}
    cold_then_warm(makers, path, order, used, first, used_is)


def main():
    # the docstring's first paragraph: its first line alone stopped --help mid-sentence
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--sequences", type=at_least(1), default=12000,
                    help="packed sequences in the built dataset (default %(default)s)")
    ap.add_argument("--seq-length", type=at_least(64), default=16384,
                    help="tokens a packed sequence (default %(default)s)")
    ap.add_argument("--reads", type=at_least(1), default=200,
                    help="random sequences read, page cache dropped first (default %(default)s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="polar_coldread_", dir=os.environ.get("TMPDIR")) as tmp:
        stem = os.path.join(tmp, "part")
        write_shard(stem, args.sequences, args.seq_length)
        bin_path = stem + ".bin"
        ds = IndexedDataset(stem)
        order = np.random.default_rng(1).integers(0, len(ds), size=args.reads)
        wanted = int(ds.per_sequence["tokens"][order].astype(np.int64).sum()) * ds.shards[0].dtype.itemsize
        size = os.path.getsize(bin_path)
        print(f"token file {size / 2**20:.0f} MiB ({len(ds):,} sequences of {args.seq_length:,} tokens), "
              f"{args.reads} random sequences ({wanted / 2**20:.1f} MiB); read_ahead_kb {read_ahead_kb(bin_path)}\n")
        engine_against_map(ds, mapped_reader, bin_path, order, wanted, "reader", "the bytes used")


if __name__ == "__main__":
    main()
