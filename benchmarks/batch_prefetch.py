"""What reading the next batch during the current step saves: training-loop time per step with the
batch read when the step asks for it, against read ahead by the loader's thread.

    python benchmarks/batch_prefetch.py [--shards 16] [--global-batch 16] [--micro-batch 2]
                                        [--seq-length 16384] [--steps 40] [--compute-ms 0 20 100]

The data is a built dataset on disk (engine.indexed_dataset, POLAR-like groups as in
benchmarks/dataset_read.py), read in the shuffled training order by engine.data.GlobalBatchLoader,
the loader the trainer uses. The step stands in for the device's work: --compute-ms of
time.sleep, which holds no GIL, as the host holds none while it waits in the step's one sync for
the GPU. Rows: ms per step, the ms a step waited for its batch, and
the ratio of loop times, synchronous first, in the same run on the same files. The page cache is
warm (a first pass reads every shard), so a read here is a collation plus memory copies; a cold
cache or a network file system makes the synchronous read, and the saving, larger.
"""
import argparse
import os
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.dataset_read import LONGEST_GROUP, write_shards  # noqa: E402
from engine.data import GlobalBatchLoader  # noqa: E402
from engine.indexed_dataset import IndexedDataset  # noqa: E402


def run(ds, args, compute_s: float, prefetch: bool) -> tuple[float, float]:
    """(ms per step, ms per step waiting for the batch) over --steps steps after one warm-up."""
    ld = GlobalBatchLoader(ds, args.global_batch, args.micro_batch, 0, 1, seed=1, pad_id=0)
    ld.next_microbatches(prefetch=prefetch)
    waited = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        batches = ld.next_microbatches(prefetch=prefetch)
        waited += time.perf_counter() - t
        time.sleep(compute_s)
        del batches
    total = time.perf_counter() - start
    ld.close()
    return total / args.steps * 1e3, waited / args.steps * 1e3


def main():
    # the docstring's first paragraph: its first line alone stopped --help mid-sentence
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--shards", type=at_least(1), default=16,
                    help="shards of the built dataset written (default %(default)s)")
    ap.add_argument("--sequences", type=at_least(1), default=8, help="packed sequences per shard")
    ap.add_argument("--seq-length", type=int, default=16384, help="tokens a packed sequence (default %(default)s)")
    ap.add_argument("--global-batch", type=at_least(1), default=16,
                    help="packed sequences a step (default %(default)s)")
    ap.add_argument("--micro-batch", type=at_least(1), default=2,
                    help="packed sequences a micro-batch (default %(default)s)")
    ap.add_argument("--steps", type=at_least(1), default=40, help="steps timed per row")
    ap.add_argument("--compute-ms", type=at_least(0, float), nargs="+", default=[0.0, 20.0, 100.0],
                    help="the stand-in step's device time")
    args = ap.parse_args()
    if args.global_batch % args.micro_batch:
        ap.error("--global-batch must be a multiple of --micro-batch")
    if args.seq_length < LONGEST_GROUP:
        ap.error(f"--seq-length must be at least {LONGEST_GROUP}: the synthetic groups run up to that many "
                 "tokens and are never split across sequences")
    with tempfile.TemporaryDirectory(prefix="polar_prefetch_") as root:
        write_shards(root, args.shards, args.sequences, args.seq_length)
        ds = IndexedDataset(root)
        if len(ds) < args.global_batch:
            ap.error(f"the dataset packed into {len(ds)} sequences, fewer than --global-batch")
        for i in range(len(ds)):  # warm the page cache
            ds.sequences([i])
        print(f"{len(ds)} sequences of {args.seq_length} tokens; global batch {args.global_batch}, micro-batch "
              f"{args.micro_batch}; {args.steps} steps a row")
        print("| step's device time (ms) | read when asked: ms/step | waited | read ahead: ms/step | waited "
              "| loop time, ahead vs asked |")
        print("|---:|---:|---:|---:|---:|---:|")
        for compute_ms in args.compute_ms:
            asked = run(ds, args, compute_ms / 1e3, prefetch=False)
            ahead = run(ds, args, compute_ms / 1e3, prefetch=True)
            print(f"| {compute_ms:g} | {asked[0]:.1f} | {asked[1]:.1f} | {ahead[0]:.1f} | {ahead[1]:.1f} "
                  f"| {ahead[0] / asked[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
