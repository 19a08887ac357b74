"""How long the server takes to find shared prefixes (polar/serve/grouping.py) in one batching round.

    python benchmarks/serve_grouping.py                    # 1,024 / 4,096 / 16,384 rollouts of one prompt
    python benchmarks/serve_grouping.py --prompts 64 --tail 200

Grouping runs in the batcher's worker thread, under the GIL, before every round: its time delays the
round's forward passes and competes with the event loop. The worst case is many rollouts of few
prompts (every item has neighbours worth grouping with, so no candidate group is cut short).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.arguments import at_least  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=at_least(1), nargs="+", default=[1024, 4096, 16384],
                    help="rollouts in one batching round, a row each (default %(default)s)")
    ap.add_argument("--prompts", type=at_least(1), default=1, help="distinct prompts the rollouts share")
    ap.add_argument("--prefix", type=at_least(0), default=40, help="tokens of the shared prefix")
    ap.add_argument("--tail", type=at_least(0), default=8, help="tokens of each rollout after it")
    ap.add_argument("--row-tokens", type=at_least(1), default=4096,
                    help="tokens a row of the batch (polar serve --row-tokens) (default %(default)s)")
    ap.add_argument("--repeats", type=at_least(1), default=3,
                    help="timed groupings of each round, the median shown (default %(default)s)")
    args = ap.parse_args(argv)

    from polar.serve.grouping import group_items

    rng = np.random.default_rng(0)
    prefixes = [rng.integers(3, 250, args.prefix) for _ in range(args.prompts)]
    print(f"| {'items':>8} | {'groups':>7} | {'seconds (best of ' + str(args.repeats) + ')':>24} | {'us/item':>8} |")
    print("|---:|---:|---:|---:|")
    for n in args.items:
        ids = [np.concatenate([[1], prefixes[i % args.prompts], rng.integers(3, 250, args.tail)]).astype(np.int32)
               for i in range(n)]
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            groups = group_items(ids, args.row_tokens)
            best = min(best, time.perf_counter() - t0)
        print(f"| {n:>8} | {len(groups):>7} | {best:>24.3f} | {best / n * 1e6:>8.1f} |")


if __name__ == "__main__":
    main()
