"""`polar data stats` on a large dataset: peak memory and wall time of its per-shard length counts
against holding every length, as it did before.

    python benchmarks/data_stats.py [--groups 10000000] [--shards 8] [--workers 1 2]

At POLAR's scale (~10^9 groups) the per-group and per-piece lengths are tens of GB: statistics
computed over them all at once (the baseline: the dataset's length arrays concatenated, then
numpy's mean, percentiles, max and a log2 histogram, as `polar/data_stats.py` did) would not fit a
login node. `polar data stats` now reads and checks each shard on its own and keeps only how many
prefixes, candidates and groups have each length (O(seq_length)), merging them into the same
figures. Each row runs in a fresh process; "peak" is the most memory numpy and Python held at once
in that process during the statistics (tracemalloc), the dataset's own open included in both: the
baseline's grows with the dataset, the per-shard one's with a chunk of about 2^20 groups
(CHUNK_GROUPS, engine/indexed_dataset.py), whatever the shards hold (with workers, each worker
holds that, and the calling process only the counts). Groups are short (a 2-token prefix
and two 1-token candidates): the index is what is measured. Every row checks every shard's index,
as `polar data stats` does.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.dataset_memory import shard_arguments, written_shards  # noqa: E402

PROBE = """
import json, sys, time, tracemalloc
import numpy as np
sys.path.insert(0, {root!r})
from engine.indexed_dataset import IndexedDataset
from polar import data_stats

def every_length(path):
    ds = IndexedDataset(path)
    ds.verify(workers=1)
    out = {{}}
    for name, a in (("prefix", ds.prefix_lengths), ("candidate", ds.candidate_lengths), ("group", ds.group_lengths)):
        edges = np.concatenate([[0], 2 ** np.arange(int(np.ceil(np.log2(max(ds.seq_length, 2)))) + 1)])
        out[name] = (float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99)), int(a.max()),
                     np.bincount(np.searchsorted(edges, a, side="right") - 1, minlength=len(edges)).tolist())
    return out

def summary(s):
    return {{name: (st["mean"], st["p50"], st["p99"], st["max"], s["histogram"][name])
             for name, st in s["lengths"].items()}}

if __name__ == "__main__":
    path, mode, workers = {path!r}, {mode!r}, {workers}
    tracemalloc.start()
    t = time.perf_counter()
    out = every_length(path) if mode == "every length" else summary(data_stats.compute(path, workers))
    seconds = time.perf_counter() - t
    print(json.dumps({{"peak": tracemalloc.get_traced_memory()[1], "s": seconds, "stats": out}}))
"""


def measure(path: str, mode: str, workers: int = 1) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PROBE.format(root=ROOT, path=path, mode=mode, workers=workers))
    try:
        out = subprocess.run([sys.executable, f.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout)


def main():
    # the docstring's first paragraph: its first line alone stopped --help mid-sentence
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    shard_arguments(ap, 10_000_000)
    ap.add_argument("--workers", type=at_least(1), nargs="+", default=[1, 2],
                    help="worker processes of the per-shard rows")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="polar_dstats_", dir=os.environ.get("TMPDIR")) as root:
        written_shards(ap, args, root)
        print("| statistics | workers | peak memory, calling process (MiB) | vs every length | wall (s) "
              "| same figures |")
        print("|---|---:|---:|---:|---:|---|")
        base = measure(root, "every length")
        rows = [("every length (before)", 1, base)] + [("per-shard length counts (engine)", w,
                                                         measure(root, "counts", w)) for w in args.workers]
        for name, w, r in rows:
            same = "yes" if r["stats"] == base["stats"] else "NO"
            print(f"| {name} | {w} | {r['peak'] / 2**20:.1f} | {r['peak'] / base['peak']:.2f}x | {r['s']:.2f} | "
                  f"{same} |", flush=True)


if __name__ == "__main__":
    main()
