#!/usr/bin/env python3
"""Offline batch scoring with the shared-prefix layout, at any TP x PP x DP layout.

    polar score --checkpoint runs/default/checkpoints --input items.jsonl --output rewards.jsonl
    torchrun --nproc_per_node 4 engine/score.py --checkpoint CKPT --input IN --output OUT --tp 2

Each input line (polar/score_input.py: an official record, a group, or one output) becomes the
exact strings and ids of the official POLAR client (polar/client_format.py); the outputs of one
line share their longest common id prefix, which the packed layout holds once. Packed sequences
are split over the data-parallel ranks, scored with the engine's forward (engine/scoring.py) and
written by rank 0 as one line per input line, in input order. This is the reference that
`polar serve` is tested against.

The model's settings come from the checkpoint (the model.json a training run saves with each step,
or the model.yaml a converted checkpoint holds); the tokenizer from `--tokenizer`, else the
checkpoint's tokenizer/ directory, else the byte tokenizer of the embedded default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import ConfigError  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="polar score", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="an engine checkpoint: a run's checkpoints/ directory, one step, or a `polar convert` output")
    ap.add_argument("--input", required=True, help="JSONL: official records, groups or {prompt, reference, output}")
    ap.add_argument("--output", required=True, help="JSONL written by rank 0, one line per input line")
    ap.add_argument("--tokenizer", default="", help="'byte' or a directory with tokenizer.json (default: the "
                                                   "checkpoint's tokenizer/, else byte)")
    ap.add_argument("--max-length", type=int, default=16384, help="the client's max_length (default 16384)")
    ap.add_argument("--max-response-length", type=int, default=4096,
                    help="the client's max_response_length (default 4096)")
    ap.add_argument("--seq-length", type=int, default=0,
                    help="packed sequence length (default: the longest line's group, rounded up to 128)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (the world size divided by tp x pp "
                                                       "is data parallel)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--nproc", type=int, default=1, help="processes on this machine (`polar score` runs torchrun "
                                                         "when > 1; under torchrun it is the world size)")
    ap.add_argument("--on-error", default="fail", choices=("fail", "skip"),
                    help="a bad input line stops the run (fail) or becomes an error line (skip)")
    return ap.parse_args(argv)


def tokenizer_spec(args, step_dir: str) -> str:
    if args.tokenizer:
        return args.tokenizer
    step = Path(step_dir)
    for d in (step.parent / "tokenizer", step.parent.parent / "tokenizer"):
        if (d / "tokenizer.json").is_file():
            return str(d)
    return "byte"


def model_config(step_dir: str):
    from engine import checkpoint
    from engine.config import ModelConfig, _build, validate

    found = checkpoint.saved_model_settings(step_dir)
    if found is None:
        raise ConfigError(f"--checkpoint {step_dir}: no model settings recorded with it (model.json in the step, "
                          "model.yaml beside it or the run's config.yaml); it was not written by this engine")
    settings, where = found
    try:
        cfg = _build(ModelConfig, settings, "model")
        validate(cfg, "model")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    return cfg


def build_groups(tok, lines, args):
    """One engine Group per scored line (the line's outputs over their common id prefix)."""
    import numpy as np

    from engine.packing import Group
    from polar.client_format import client_encode_batch

    items = [it for ln in lines for it in ln.items]
    served = client_encode_batch(tok, items, max_length=args.max_length,
                                 max_response_length=args.max_response_length)
    groups, k = [], 0
    for ln in lines:
        ids = [s.ids for s in served[k:k + len(ln.items)]]
        k += len(ln.items)
        if not ids:
            continue
        n = min(len(x) for x in ids) - 1  # every candidate keeps at least its reward token
        for x in ids[1:]:
            diff = np.flatnonzero(x[:n] != ids[0][:n])
            n = int(diff[0]) if diff.size else n
        groups.append(Group(prefix=ids[0][:n], candidates=[x[n:] for x in ids], labels=None))
    return groups


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    from engine.quiet import silence_known_warnings

    silence_known_warnings()
    try:
        return run(args)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    import numpy as np

    from engine import checkpoint
    from engine.config import ParallelConfig, TrainConfig
    from engine.packing import collate, plan_sequences
    from polar.records import RecordError
    from polar.score_input import output_row, read_score_input
    from polar.tokenizer import load_tokenizer

    t0 = time.time()
    try:
        step_dir = checkpoint.resolve(args.checkpoint)
    except checkpoint.CheckpointNotFound as e:
        raise ConfigError(f"--checkpoint {args.checkpoint}: {e}") from None
    mcfg = model_config(step_dir)
    spec = tokenizer_spec(args, step_dir)
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--tokenizer {spec}: {e}") from e
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"the tokenizer ({spec}) has {tok.vocab_size} ids, the model's vocabulary only "
                          f"{mcfg.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)")
    try:
        lines = read_score_input(args.input, args.on_error)
    except RecordError as e:
        raise ConfigError(f"{e} (--on-error skip writes an error line instead)") from None
    except OSError as e:
        raise ConfigError(f"--input {args.input}: {e}") from None
    scored = [ln for ln in lines if ln.error is None]
    groups = build_groups(tok, scored, args)
    lengths = np.array([len(g) for g in groups], dtype=np.int64)
    longest = int(lengths.max()) if len(lengths) else 1
    seq = args.seq_length or -(-longest // 128) * 128
    if longest > seq:
        line = scored[int(lengths.argmax())].line
        raise ConfigError(f"{args.input}:{line}: its outputs take {longest} tokens, more than --seq-length {seq}")
    if longest > mcfg.max_position_embeddings:
        line = scored[int(lengths.argmax())].line
        raise ConfigError(f"{args.input}:{line}: {longest} tokens, more than model.max_position_embeddings="
                          f"{mcfg.max_position_embeddings}")

    from engine.parallelize import build_model
    from engine.runtime import init_runtime, shutdown_runtime, validate_layout, world_size_from_env
    from engine.scoring import score_data_parallel

    train = TrainConfig(precision=args.precision, global_batch=1, micro_batch=1)
    par = ParallelConfig(tp=args.tp, pp=args.pp, distributed_optimizer=False)
    world = world_size_from_env()
    dp = validate_layout(mcfg, par, TrainConfig(global_batch=max(1, world // (args.tp * args.pp))), world, seq)
    rt = init_runtime(par, seed=0)
    chunks, _ = build_model(mcfg, par, train, rt)
    checkpoint.load(step_dir, chunks, None)
    plan = plan_sequences(lengths, seq, method="ordered")
    batches = [collate([[groups[g] for g in p]], seq, tok.pad_id) for p in plan]
    rewards = score_data_parallel(chunks, batches, rt.device).cpu()
    if rt.is_main:
        # collate numbers candidates sequence by sequence, group by group: map them back to lines
        order = np.concatenate(plan) if plan else np.zeros(0, dtype=np.int64)
        per_group = np.array([len(groups[g].candidates) for g in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(per_group)])
        by_group = {int(g): rewards[starts[i]:starts[i + 1]].tolist() for i, g in enumerate(order)}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w") as f:
            gi = 0
            for ln in lines:
                if ln.error is None:
                    f.write(json.dumps(output_row(ln, by_group[gi])) + "\n")
                    gi += 1
                else:
                    f.write(json.dumps(output_row(ln, [])) + "\n")
        n_items = sum(len(g.candidates) for g in groups)
        dup = int(sum(len(g.prefix) * (len(g.candidates) - 1) for g in groups))
        print(f"scored {n_items:,} outputs of {len(scored):,} lines ({len(lines) - len(scored)} bad) in "
              f"{len(batches):,} packed sequences of {seq} tokens at tp={rt.tp} pp={rt.pp} dp={dp}; shared "
              f"prefixes saved {dup:,} tokens; {time.time() - t0:.1f}s; wrote {args.output}", flush=True)
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
