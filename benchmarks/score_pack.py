"""polar score's packing of a chunk (engine/score.py CheckpointScorer.pack and score_packed), CPU only.

    python benchmarks/score_pack.py [--chunks 16] [--chunk-groups 1024] [--groups 16384] [--candidates 8]

First table: each chunk of --chunk-groups groups planned in input order (next-fit, what pack() did)
and best fit (what it does, as polar serve packs its rows), each into rows of the chunk's longest
group rounded up to 128 tokens, as pack() sizes them without --seq-length. Fill = the groups' tokens
/ (rows x row length), over all the chunks; the planning time is the best of 3 per chunk, summed.
Lengths: log-normal (median 1,500 tokens, sigma 0.85, 32-16,384) and uniform 100-6,000.

Second table: the rewards of --groups groups of --candidates each mapped back to their lines from
collate's order, as score_packed did (a tensor slice and tolist per group) and as it does
(engine.scoring.rewards_per_group: one tolist, then list slices), best of 5; the two give the same
lists (checked).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.cpu_references import best_of  # noqa: E402
from engine.pack_plan import plan_sequences  # noqa: E402

DISTRIBUTIONS = {
    "log-normal, median 1,500": lambda rng, n: np.clip(rng.lognormal(np.log(1500), 0.85, n), 32, 16384),
    "uniform 100-6,000": lambda rng, n: rng.integers(100, 6001, n),
}


def packing_rows(chunks: int, chunk_groups: int) -> list:
    rows = []
    for name, draw in DISTRIBUTIONS.items():
        rng = np.random.default_rng(0)
        got = {m: {"rows": 0, "capacity": 0, "s": 0.0} for m in ("ordered", "best_fit")}
        tokens = 0
        for _ in range(chunks):
            lengths = draw(rng, chunk_groups).astype(np.int64)
            seq = -(-int(lengths.max()) // 128) * 128
            tokens += int(lengths.sum())
            for method, g in got.items():
                plan = plan_sequences(lengths, seq, method)
                g["rows"] += len(plan)
                g["capacity"] += len(plan) * seq
                g["s"] += best_of(lambda: plan_sequences(lengths, seq, method), 3)
        o, b = got["ordered"], got["best_fit"]
        rows.append(f"| {name} | {chunks} x {chunk_groups:,} | {o['rows']:,} | {b['rows']:,} | "
                    f"{100 * tokens / o['capacity']:.1f}% | {100 * tokens / b['capacity']:.1f}% | "
                    f"{o['rows'] / b['rows']:.2f}x | {1e3 * o['s'] / chunks:.2f} | {1e3 * b['s'] / chunks:.2f} |")
    return rows


def per_group_tolist(rewards, order: list, candidates: list) -> list:
    """score_packed's mapping before: a tensor slice and its tolist per group."""
    per_group, start = [None] * len(order), 0
    for g, n in zip(order, candidates):
        per_group[g] = rewards[start:start + n].tolist()
        start += n
    return per_group


def mapping_row(groups: int, candidates: int) -> str:
    import torch

    from engine.scoring import rewards_per_group

    rng = np.random.default_rng(0)
    order = rng.permutation(groups).tolist()
    counts = [candidates] * groups
    rewards = torch.randn(groups * candidates)
    before = best_of(lambda: per_group_tolist(rewards, order, counts), 5)
    now = best_of(lambda: rewards_per_group(rewards, order, counts), 5)
    assert rewards_per_group(rewards, order, counts) == per_group_tolist(rewards, order, counts)
    return f"| {groups:,} x {candidates} | {1e3 * before:.1f} | {1e3 * now:.1f} | {before / now:.2f}x |"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=at_least(1), default=16,
                    help="chunks planned for the first table (default %(default)s)")
    ap.add_argument("--chunk-groups", type=at_least(1), default=1024, help="groups a chunk (default %(default)s)")
    ap.add_argument("--groups", type=at_least(1), default=16384,
                    help="groups mapped back for the second table (default %(default)s)")
    ap.add_argument("--candidates", type=at_least(1), default=8,
                    help="candidates a group in the second table (default %(default)s)")
    args = ap.parse_args(argv)
    print("| lengths | chunks x groups | rows, input order | rows, best fit | fill, input order | fill, best fit "
          "| rows: input order / best fit | plan ms a chunk, input order | plan ms a chunk, best fit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(packing_rows(args.chunks, args.chunk_groups)))
    print()
    print("| groups x candidates | ms, a tolist per group (before) | ms, one tolist (now) | before / now |")
    print("|---|---:|---:|---:|")
    print(mapping_row(args.groups, args.candidates))


if __name__ == "__main__":
    main()
