"""`polar data stats`: what a built dataset holds, from its index alone (no token is read); it also
checks every shard's whole index (a training run checks only what it reads, as it reads it).

    polar data stats ds/ [--json]

Counts (records, groups, candidates, sequences, tokens), length histograms of prefixes,
candidates and whole groups (log2 bins), packing efficiency (real tokens / sequences x
seq_length), and the tokens the shared prefix saves: a layout that repeats the prefix for every
candidate would hold sum(prefix x (K - 1)) more tokens.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def log2_histogram(lengths: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges 0, 1, 2, 4, ..., >= top (bin i holds edges[i] <= n < edges[i+1]) and the counts."""
    edges = np.concatenate([[0], 2 ** np.arange(int(np.ceil(np.log2(max(top, 2)))) + 1)]).astype(np.int64)
    counts = np.bincount(np.searchsorted(edges, lengths, side="right") - 1, minlength=len(edges))
    return edges, counts[:len(edges)]


def compute(path: str) -> dict:
    from engine.indexed_dataset import IndexedDataset

    ds = IndexedDataset(path)
    ds.verify(log=lambda line: print(line, file=sys.stderr, flush=True))
    prefix, cand, group = ds.prefix_lengths, ds.candidate_lengths, ds.group_lengths
    k = ds.candidates_per_group
    duplicated = int((prefix * (k - 1)).sum())
    real = ds.num_real_tokens
    # Lines less blank ones; metadata from before "blank" was counted gives lines.
    records = [c["lines"] - c.get("blank", 0) if "lines" in c else None
               for c in (s.meta.get("counts", {}) for s in ds.shards)]
    rejected = [s.meta.get("counts", {}).get("rejected") for s in ds.shards]
    top = int(max(group.max(initial=1), ds.seq_length))
    edges, _ = log2_histogram(np.zeros(0, dtype=np.int64), top)
    return {
        "path": str(path),
        "shards": len(ds.shards),
        "seq_length": ds.seq_length,
        "tokenizer": ds.meta.get("tokenizer"),
        "records": sum(records) if None not in records else None,
        "rejected": sum(rejected) if None not in rejected else None,
        "groups": ds.num_groups,
        "candidates": int(k.sum()),
        "sequences": len(ds),
        "tokens": real,
        "packing_efficiency": ds.packing_efficiency,
        "shared_prefix": {
            "tokens_saved": duplicated,
            "percent_saved": 100.0 * duplicated / max(1, real + duplicated),
            "tokens_if_duplicated": real + duplicated,
        },
        "lengths": {
            name: {"mean": float(a.mean()) if a.size else 0.0,
                   "p50": float(np.percentile(a, 50)) if a.size else 0.0,
                   "p99": float(np.percentile(a, 99)) if a.size else 0.0,
                   "max": int(a.max(initial=0))}
            for name, a in (("prefix", prefix), ("candidate", cand), ("group", group))
        },
        "histogram": {
            "bin_start": edges.tolist(),
            **{name: log2_histogram(a, top)[1].tolist() for name, a in (("prefix", prefix), ("candidate", cand),
                                                                        ("group", group))},
        },
    }


def format_text(s: dict) -> str:
    sp = s["shared_prefix"]
    rec = f"{s['records']:,}" if s["records"] is not None else "?"
    rej = f" ({s['rejected']:,} rejected)" if s["rejected"] else ""
    lines = [
        f"{s['path']}: {s['shards']} shard(s), seq_length {s['seq_length']}, tokenizer {s['tokenizer']}",
        f"  records {rec}{rej} | groups {s['groups']:,} | candidates {s['candidates']:,} | "
        f"sequences {s['sequences']:,} | tokens {s['tokens']:,}",
        f"  packing efficiency {s['packing_efficiency']:.2%} (real tokens / sequences x seq_length)",
        f"  shared prefixes save {sp['tokens_saved']:,} tokens ({sp['percent_saved']:.1f}% of the "
        f"{sp['tokens_if_duplicated']:,} a per-candidate layout would hold)",
        "",
        f"  {'length':<8} {'mean':>9} {'p50':>9} {'p99':>9} {'max':>9}",
    ]
    for name, st in s["lengths"].items():
        lines.append(f"  {name:<8} {st['mean']:>9.1f} {st['p50']:>9.0f} {st['p99']:>9.0f} {st['max']:>9}")
    h = s["histogram"]
    lines += ["", f"  {'tokens':<15} {'prefixes':>10} {'candidates':>11} {'groups':>10}"]
    starts = h["bin_start"]
    for i, lo in enumerate(starts):
        if not (h["prefix"][i] or h["candidate"][i] or h["group"][i]):
            continue
        label = f"{lo}-{starts[i + 1] - 1}" if i + 1 < len(starts) else f">={lo}"
        lines.append(f"  {label:<15} {h['prefix'][i]:>10,} {h['candidate'][i]:>11,} {h['group'][i]:>10,}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="polar data stats", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="dataset directory (or one shard path without suffix)")
    ap.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = ap.parse_args(argv)
    from engine.shard_format import DatasetFormatError

    try:
        stats = compute(args.path)
    except (DatasetFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1) if args.json else format_text(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
