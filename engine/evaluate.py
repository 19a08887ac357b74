#!/usr/bin/env python3
"""Preference accuracy with references on ranked data (the paper's evaluation, Sec. 4): a record
holds a prompt, a category and ranked responses; rank 1 is the reference, and every ordered pair of
ranks below it counts once (polar/ranked_eval.py). Scored with engine/score.py's CheckpointScorer
(the official client's exact format, shared prefixes, any layout); prints the table, writes JSON.

    polar eval --checkpoint runs/default/checkpoints --input ranked.jsonl --json accuracy.json
    torchrun --nproc_per_node 2 engine/evaluate.py --checkpoint CKPT --input ranked.jsonl --tp 2
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import ConfigError  # noqa: E402
from engine.cli_types import ArgumentParser, count_at_least  # noqa: E402
from engine.score import MAX_LENGTH_HELP, MAX_RESPONSE_HELP  # noqa: E402


def parse_args(argv=None, prog: str = "polar eval"):
    ap = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="an engine checkpoint (directory or one step)")
    ap.add_argument("--input", required=True, help="ranked JSONL (polar/ranked_eval.py documents the record)")
    ap.add_argument("--json", default="", help="write the result here as JSON")
    ap.add_argument("--tokenizer", default="", help="'byte' or a tokenizer directory (default: the checkpoint's)")
    ap.add_argument("--max-length", type=count_at_least(0), default=None, help=MAX_LENGTH_HELP)
    ap.add_argument("--max-response-length", type=count_at_least(0), default=None, help=MAX_RESPONSE_HELP)
    ap.add_argument("--seq-length", type=count_at_least(0), default=0,
                    help="packed sequence length (default: the longest record)")
    ap.add_argument("--tp", type=count_at_least(1), default=1,
                    help="tensor-parallel size (the world size divided by tp x pp is data parallel)")
    ap.add_argument("--pp", type=count_at_least(1), default=1, help="pipeline-parallel size")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="auto: bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--progress-s", type=float, default=30.0,
                    help="seconds between progress lines while scoring (default 30; 0: after every schedule call)")
    ap.add_argument("--nproc", type=count_at_least(1), default=1, help="processes on this machine (torchrun when > 1)")
    args = ap.parse_args(argv)
    from polar.client_limits import usage_check

    usage_check(ap, args.max_length, args.max_response_length)
    return args


def main(argv=None, prog: str | None = None) -> int:
    """`prog`: the name in the usage and errors, default how this entry was called (engine.called_as:
    `polar eval` under polar, else the path typed or `python -m engine.evaluate`)."""
    from engine.called_as import called_as

    prog = called_as("engine.evaluate", prog)
    args = parse_args(argv, prog)
    rank = int(os.environ.get("RANK", "0"))
    from engine.cuda_env import order_tp_launches
    from engine.quiet import silence_known_warnings

    order_tp_launches(args.tp)  # before the first CUDA call
    silence_known_warnings()
    from engine.interrupt import exit_status

    # the accuracy needs every record scored: a stop before the end keeps nothing
    leaves = ["nothing is written (the accuracy comes once every record is scored); the same command starts again"]
    return exit_status(lambda interrupts: run(args, rank, leaves), leaves, rank == 0, prog)


def run(args, rank: int, leaves: list) -> int:
    from engine.runtime import shutdown_runtime
    from engine.score import CheckpointScorer, writable_output
    from polar.ranked_eval import evaluate_ranked, format_table, read_ranked, scoring_items, write_result
    from polar.records import RecordError

    scorer = CheckpointScorer(args.checkpoint, args.tokenizer, args.tp, args.pp, args.precision,
                              args.max_length, args.max_response_length)
    try:
        records = read_ranked(args.input)
    except RecordError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"--input {args.input}: {e}") from None
    if not records:
        raise ConfigError(f"--input {args.input}: no ranked record to evaluate")
    scorer.check_seq_length(args.seq_length)
    if args.json:
        writable_output(args.json, "--json", {"--input": args.input})
    # the record line of each item evaluate_ranked scores (a record's items come together, in order, each
    # distinct response once: scoring_items); not found by the item's prompt object: equal short strings
    # are one object (CPython shares them)
    scored = scoring_items(records)
    owners = [r.line for r, idx in zip(records, scored[1]) for _ in set(idx) - {-1}]
    scorer.start()

    def score_fn(items):
        # a record's items share its prompt and reference: one group each
        lists: list[list] = []
        lines: list[int] = []
        for it, line in zip(items, owners, strict=True):
            if lines and lines[-1] == line:
                lists[-1].append(it)
            else:
                lists.append([it])
                lines.append(line)
        # --seq-length also splits a record whose responses together pass it, as polar score does
        rewards, _ = scorer.score_groups(scorer.groups(lists, args.seq_length), args.seq_length,
                                         where=lambda i: f"{args.input}:{lines[i]}", progress_s=args.progress_s)
        return [r for group in rewards for r in group]

    result = evaluate_ranked(records, score_fn, scored)
    if rank == 0:
        print(format_table(result))
        if args.json:
            write_result(result, args.json)
            print(f"wrote {args.json}")
    leaves[0] = "the evaluation is complete" + (f" and in {args.json}" if args.json else "")
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
