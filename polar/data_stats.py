"""`polar data stats`: what a built dataset holds, from its index alone (no token is read); it also
checks every shard's whole index (a training run checks only what it reads, as it reads it).

    polar data stats ds/ [--json] [--workers N]

Counts (records, groups, candidates, sequences, tokens; what the build's truncation cut, from its
metadata), length histograms of prefixes, candidates and whole groups (log2 bins), packing
efficiency (real tokens / sequences x seq_length), and the tokens the shared prefix saves: a layout
that repeats the prefix for every candidate would hold sum(prefix x (K - 1)) more tokens.

Each shard is read (and checked) a run of sequences at a time (about 10^6 groups) and only length
counts are kept, so memory grows with neither the dataset nor its shards; at 10^7 groups and more
the shards are shared out to one process a core (`--workers`), and a progress line with an ETA
comes every 10 s.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from engine.cli_types import ArgumentParser


def log2_histogram(counts: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges 0, 1, 2, 4, ..., >= top (bin i holds edges[i] <= n < edges[i+1]) and the counts of
    the lengths `counts` holds (a bincount: counts[v] lengths equal v)."""
    edges = np.concatenate([[0], 2 ** np.arange(int(np.ceil(np.log2(max(top, 2)))) + 1)]).astype(np.int64)
    padded = np.zeros(max(len(counts), int(edges[-1]) + 1), np.int64)
    padded[:len(counts)] = counts
    return edges, np.add.reduceat(padded, edges)


def shard_summary(shard) -> dict:
    """One shard's index checked whole, and what the statistics need of it: how many prefixes,
    candidates and groups have each length (bincounts up to seq_length, which no group exceeds in
    a checked index) and the tokens a per-candidate layout would repeat. O(seq_length)
    to send back and merge, whatever the shard holds (at 10^9 groups the lengths themselves are
    tens of GB); counted chunk by chunk as verify checks them."""
    from engine.shard_format import segment_sums

    n = shard.seq_length + 1
    out = {"prefix": np.zeros(n, np.int64), "candidate": np.zeros(n, np.int64), "group": np.zeros(n, np.int64),
           "duplicated": 0}

    def add(ix) -> None:
        piece = np.diff(ix.piece_tokens)
        is_prefix = ix.piece_label < 0
        k = np.diff(ix.group_pieces) - 1
        prefix = piece[is_prefix]
        for name, lengths in (("prefix", prefix), ("candidate", piece[~is_prefix]),
                              ("group", segment_sums(piece, ix.group_pieces))):
            out[name] += np.bincount(lengths, minlength=n)
        out["duplicated"] += int((prefix * (k - 1)).sum())

    shard.verify(each=add)
    return out


def candidate_count(ds) -> int:
    """The candidates of the IndexedDataset `ds`, from its shards' index headers in O(1) a shard (no
    array is read): a group's first piece is its prefix and the rest its candidates
    (engine/shard_format.py), so a shard holds pieces - groups candidates. The count that `polar data
    stats` reports and `polar hparams --dataset` divides by the packed sequences (polar/hparams.py)."""
    candidates = 0
    for shard in ds.shards:
        ix = shard.mapped_index()
        candidates += len(ix.piece_label) - (len(ix.group_pieces) - 1)
    return candidates


def length_summary(counts: np.ndarray) -> dict:
    """mean, p50, p99 (numpy's default, linear interpolation) and max of the lengths that
    `counts` (a bincount: counts[v] lengths equal v) holds, exactly."""
    n = int(counts.sum())
    if n == 0:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0, "max": 0}
    values = np.arange(len(counts))
    cum = np.cumsum(counts)

    def at(i: int) -> int:  # the i-th smallest length (0-based)
        return int(np.searchsorted(cum, i, side="right"))

    def percentile(q: float) -> float:
        # numpy's own steps and rounding (numpy.lib._function_base_impl: the "linear" virtual index,
        # _lerp from the nearer end), not just its formula: (n - 1) * q / 100 or a + (b - a) * t
        # alone differ from it in the last bits of most p99s
        pos = (n - 1) * (q / 100)
        if pos >= n - 1:
            return float(at(n - 1))
        lo = int(np.floor(pos))
        a, b, t = at(lo), at(lo + 1), pos - lo
        return float(b - (b - a) * (1 - t)) if t >= 0.5 else float(a + (b - a) * t)

    return {"mean": float((values * counts).sum() / n), "p50": percentile(50), "p99": percentile(99),
            "max": int(np.flatnonzero(counts)[-1])}


def compute(path: str, workers: int | None = None) -> dict:
    from engine.indexed_dataset import IndexedDataset

    ds = IndexedDataset(path)
    total = None  # summed as the shards come: one shard's counts held at a time, not every shard's
    for part in ds.each_shard(shard_summary, workers, log=lambda line: print(line, file=sys.stderr, flush=True)):
        total = part if total is None else {k: total[k] + v for k, v in part.items()}
    lengths = {name: total[name] for name in ("prefix", "candidate", "group")}
    duplicated = total["duplicated"]
    real = ds.num_real_tokens
    # Lines less blank ones; metadata from before "blank" was counted gives lines.
    records = [c["lines"] - c.get("blank", 0) if "lines" in c else None
               for c in (s.meta.get("counts", {}) for s in ds.shards)]

    def summed(key: str):  # None where a shard's build did not count it (built before it was counted)
        values = [s.meta.get("counts", {}).get(key) for s in ds.shards]
        return sum(values) if None not in values else None

    edges, _ = log2_histogram(np.zeros(0, np.int64), ds.seq_length)
    return {
        "path": str(path),
        "shards": len(ds.shards),
        "seq_length": ds.seq_length,
        "tokenizer": ds.meta.get("tokenizer"),
        "records": sum(records) if None not in records else None,
        "rejected": summed("rejected"),
        # records that repeat an earlier one of their own shard exactly (the build keeps and counts them;
        # shards built apart are not compared)
        "duplicates": summed("duplicates"),
        "groups": ds.num_groups,
        "candidates": candidate_count(ds),
        "sequences": len(ds),
        "tokens": real,
        "packing_efficiency": ds.packing_efficiency,
        # what the build cut: POLAR's rule (responses to their head, prompts to their tail) and beyond it
        "truncation": {key: summed(key) for key in ("responses_cut", "prompts_cut", "prompts_shortened")},
        "shared_prefix": {
            "tokens_saved": duplicated,
            "percent_saved": 100.0 * duplicated / max(1, real + duplicated),
            "tokens_if_duplicated": real + duplicated,
        },
        "lengths": {name: length_summary(c) for name, c in lengths.items()},
        "histogram": {
            "bin_start": edges.tolist(),
            **{name: log2_histogram(c, ds.seq_length)[1].tolist() for name, c in lengths.items()},
        },
    }


def _truncation_line(t: dict) -> list[str]:
    if t["responses_cut"] is None:
        return ["  truncation not counted by the build that wrote a shard (rebuild to see it)"]
    return [f"  truncation {t['responses_cut']:,} responses cut to their head (max_response), "
            f"{t['prompts_cut']:,} prompts to their tail (max_length); {t['prompts_shortened']:,} prompts "
            "shortened further to fit the pack"]


def format_text(s: dict) -> str:
    sp = s["shared_prefix"]
    rec = f"{s['records']:,}" if s["records"] is not None else "?"
    notes = [f"{s['rejected']:,} rejected"] if s["rejected"] else []
    if s["duplicates"]:
        notes.append(f"{s['duplicates']:,} repeat an earlier record of their shard")
    rej = f" ({', '.join(notes)})" if notes else ""
    lines = [
        f"{s['path']}: {s['shards']} shard(s), seq_length {s['seq_length']}, tokenizer {s['tokenizer']}",
        f"  records {rec}{rej} | groups {s['groups']:,} | candidates {s['candidates']:,} | "
        f"sequences {s['sequences']:,} | tokens {s['tokens']:,}",
        f"  packing efficiency {s['packing_efficiency']:.2%} (real tokens / sequences x seq_length)",
        # the paper's batches count RM sequences (one per candidate); train.global_batch counts packs
        f"  candidates per packed sequence {s['candidates'] / max(1, s['sequences']):.2f} (the paper's batch is in "
        "candidates: `polar hparams --dataset` gives the train.global_batch that carries it)",
        *_truncation_line(s["truncation"]),
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
    ap = ArgumentParser(prog="polar data stats", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The statistics go to stdout (a table, or JSON with --json), progress "
                                        "lines to stderr.\nexit status 2: no dataset there, or an index that "
                                        "fails its check (named on stderr)")
    ap.add_argument("path", help="dataset directory (or one shard path without suffix)")
    ap.add_argument("--json", action="store_true", help="print the statistics as JSON")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes reading the shards' indexes, at most one a shard (default: 1 below 10^7 "
                         "groups, else one a core, at most 32)")
    args = ap.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        ap.error(f"--workers must be at least 1, got {args.workers}")
    from engine.shard_format import DatasetFormatError

    try:
        stats = compute(args.path, args.workers)
    except (DatasetFormatError, OSError) as e:
        print(f"polar data stats: {e}", file=sys.stderr)  # as every polar command names itself
        return 2
    print(json.dumps(stats, indent=1) if args.json else format_text(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
