"""`polar score`'s check of every line against --seq-length before the model loads: what it costs
each rank, and the ranks together, against the check as commit 702550e ran it, CPU.

    python benchmarks/score_prepass.py [--lines 4000] [--outputs 8] [--ranks 1 2 4 8] [--repeats 1]

With a --seq-length below what the client's truncation can leave (--max-length + 15 with the byte
tokenizer: --seq-length 2048 at the default lengths), polar score tokenizes every unscored line
before the model loads, so that a line too long for it is named before a load of minutes
(polar/score_length_check.py, first_too_long). The baseline, timed in the same invocation on the
same input, is that check as 702550e ran it: every rank built every line's groups
(CheckpointScorer.groups, the scoring pass's tokenization and grouping). Now rank r of W reads,
parses and tokenizes only the r-th of W runs of consecutive lines and takes only each output's
token count (polar.score_length_check's share and first_in_share; the lines before its share it
reads without parsing). The ranks' shares are timed here in one process, one after another (on a
node each rank has its own cores and they run at once): the slowest share is what the check adds
before the load, the sum of the shares the host CPU it costs. Every share is checked to find what
the baseline finds (no line too long here: the whole input is read, as in a run that goes on to
score).

Without --checkpoint a small model is trained for one step first (benchmarks/score_chunks.py's);
only its settings are read (its positions, which settle --max-length), no weight.
"""
import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402

SEQ_LENGTH = 2048


# outputs of 15-34 words (~150 bytes): a line of 8 is one group within 2048 tokens; of 30-54
# (~250 bytes): more than 2048, split into groups that fit (line_groups), as the review's input was
SHAPES = {"short outputs": (15, 35), "long outputs": (30, 55)}


def write_input(path: str, lines: int, outputs: int, words_out: tuple, seed: int = 0) -> None:
    """Lines of one prompt (~250 bytes), one reference (~150) and `outputs` outputs of `words_out`
    words (low, high: high excluded)."""
    rng = np.random.default_rng(seed)
    vocab = "alpha beta gamma delta reward model policy token answer step".split()

    def words(n) -> str:
        return " ".join(rng.choice(vocab, int(n)))

    rows = ({"prompt": f"Q{i} {words(40)}", "reference": words(25),
             "candidates": [f"{j} {words(rng.integers(*words_out))}" for j in range(outputs)]} for i in range(lines))
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def baseline(scorer, path: str, limit: int, lines: tuple, chunk_lines: int):
    """The check as 702550e ran it on every rank: every line's groups, the first past `limit`."""
    from polar.score_input import iter_score_input

    source = iter_score_input(path, "skip", after_line=lines[0], until_line=lines[1])
    while chunk := list(itertools.islice(source, chunk_lines)):
        chunk = [ln for ln in chunk if ln.error is None]
        for ln, g in zip(chunk, scorer.groups([ln.items for ln in chunk], limit)):
            if len(g) > limit:
                return ln.line, len(g)
    return None


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=at_least(1), default=4000, help="input lines (default 4000)")
    ap.add_argument("--outputs", type=at_least(1), default=8, help="outputs a line (default 8)")
    ap.add_argument("--ranks", type=at_least(1), nargs="+", default=[1, 2, 4, 8],
                    help="world sizes whose shares are timed (default 1 2 4 8)")
    ap.add_argument("--repeats", type=at_least(1), default=1,
                    help="rounds, each timing the baseline and every share once; the least of each kept (default 1)")
    ap.add_argument("--checkpoint", default="", help="a checkpoint whose settings are read (default: train one)")
    args = ap.parse_args()

    from benchmarks.score_chunks import small_checkpoint
    from engine.score import CheckpointScorer
    from polar.client_limits import overrun
    from polar.score_input import survey_score_input
    from polar.score_length_check import first_in_share, share

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or small_checkpoint(tmp)
        scorer = CheckpointScorer(checkpoint, tokenizer="byte")
        limit = min(SEQ_LENGTH, scorer.model_cfg.max_position_embeddings)
        assert limit < scorer.max_length + overrun(scorer.tokenizer), "the check would not run at these lengths"
        rows = []
        for shape, words_out in SHAPES.items():
            inp = os.path.join(tmp, "in.jsonl")
            write_input(inp, args.lines, args.outputs, words_out)
            numbers = survey_score_input(inp)[0]  # polar score's check of every line, before these
            # imports and first calls (the grouping's, numpy's) out of the timings
            baseline(scorer, inp, limit, (0, 20), 1024)
            first_in_share(scorer.encoded, inp, limit, (0, 20), 1024)
            # the baseline and every share timed once a round, the least of the rounds kept: a load
            # that changes during the run weighs on both sides alike
            base_s, shares, want = float("inf"), {w: [float("inf")] * w for w in args.ranks}, None
            for _ in range(args.repeats):
                t, want = timed(lambda: baseline(scorer, inp, limit, (0, numbers[-1]), 1024))
                base_s = min(base_s, t)
                for world in args.ranks:
                    chunk = min(1024 * world, 16384)  # polar score's default --chunk-lines at DP `world`
                    for rank in range(world):
                        span = share(numbers, rank, world)
                        t, got = timed(lambda: first_in_share(scorer.encoded, inp, limit, span, chunk))
                        assert got == want, (shape, world, rank, got, want)
                        shares[world][rank] = min(shares[world][rank], t)
            rows += [(shape, w, base_s, max(shares[w]), w * base_s, sum(shares[w])) for w in args.ranks]
    load_after = os.getloadavg()[0]

    shapes = ", ".join(f"{name}: {lo}-{hi - 1} words" for name, (lo, hi) in SHAPES.items())
    print(f"{args.lines:,} lines of {args.outputs} outputs ({shapes}), --seq-length {limit}, byte tokenizer; the "
          f"least of {args.repeats} round(s); load average {load_before:.1f} before, {load_after:.1f} after")
    print()
    print("| input | ranks | lines tokenized by each rank: 702550e / now | 702550e: s a rank | now: s, slowest "
          "rank | a rank's wait before the load: 702550e / now | CPU s, all ranks: 702550e / now "
          "| CPU: 702550e / now |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape, world, old, new, old_cpu, new_cpu in rows:
        print(f"| {shape} | {world} | {args.lines:,} / {-(-args.lines // world):,} | {old:.2f} | {new:.2f} | "
              f"**{old / new:.2f}x** | {old_cpu:.2f} / {new_cpu:.2f} | {old_cpu / new_cpu:.2f}x |")


if __name__ == "__main__":
    main()
