#!/usr/bin/env python3
"""Offline batch scoring with the shared-prefix layout, at any TP x PP x DP layout.

    polar score --checkpoint runs/default/checkpoints --input items.jsonl --output rewards.jsonl
    torchrun --nproc_per_node 4 engine/score.py --checkpoint CKPT --input IN --output OUT --tp 2

Each input line (polar/score_input.py: an official record, a group, or one output) becomes the
exact strings and ids of the official POLAR client (polar/client_format.py); the outputs of one
line share their longest common id prefix, which the packed layout holds once (a line whose outputs
together pass the model's positions, or --seq-length, is split into groups that fit, as `polar
serve` groups rollouts: each output's reward is the one it gets in one group). Packed sequences
are split over the data-parallel ranks, scored with the engine's forward (engine/scoring.py) and
written by rank 0 as one line per input line, in input order. This is the reference that
`polar serve` is tested against.

The input is read twice: once to check every line before a model is loaded, then --chunk-lines
lines at a time, each chunk tokenized, packed, scored and appended to OUTPUT.partial
(polar/score_output.py), so the host holds two chunks, not the input, and a stopped run loses at
most one chunk: the same command run again continues after the rows already written. OUTPUT
appears when the last line is written. The next chunk is read, tokenized and packed on a second
thread while the model scores this one (the device does not wait for the host between chunks); an
error found there (a bad line, an input cut short) stops the run where it would have without that
thread, after this chunk's rows are written. Without --seq-length each chunk's packed length is its
longest group's, rounded up to 128. On a CUDA device that thread also copies the chunk's packed
batches into pinned (page-locked) host memory, so their copies to the device are asynchronous
(POLAR_SCORE_PIN_MEMORY=0: left in pageable memory; the rows are the same). A --seq-length below
what the client's truncation can leave (--max-length + 15 with the byte tokenizer) has the input
read once more before the model is loaded, to find a line too long for it, each rank tokenizing
its share of the lines (polar/score_length_check.py). That run over the file is polar/score_run.py.

The model's settings come from the checkpoint (the model.json a training run saves with each step,
or the model.yaml a converted checkpoint holds); the tokenizer from `--tokenizer`, else the
tokenizer the checkpoint was trained with (polar/checkpoint_tokenizer.py: its tokenizer/ directory, or
what its run's config.yaml says).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cli_types import ArgumentParser, count_at_least  # noqa: E402
from engine.config import ConfigError  # noqa: E402

PIN_ENV = "POLAR_SCORE_PIN_MEMORY"
MAX_LENGTH_HELP = ("the client's max_length (default 16384, or less where the model's positions hold no item of "
                   "that length: the largest that fits, said at start-up)")
# polar/client_limits.py, fitting_response: the client's truncation needs max_length >= 2 x max_response_length + 6
MAX_RESPONSE_HELP = ("the client's max_response_length (default: min(4096, (L - 6) // 2) for the --max-length L in "
                     "use, given or its default: the largest that leaves L a prompt budget; said at start-up when "
                     "below 4096)")


def parse_args(argv=None, prog: str = "polar score"):
    ap = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="an engine checkpoint: a run's checkpoints/ directory, one step, or a `polar convert` output")
    ap.add_argument("--input", required=True, help="JSONL: official records, groups or {prompt, reference, output}")
    ap.add_argument("--output", required=True, help="JSONL written by rank 0, one line per input line (OUTPUT.partial "
                                                    "while it runs: the same command run again continues it)")
    ap.add_argument("--tokenizer", default="", help="'byte' or a directory with tokenizer.json (default: the "
                                                   "tokenizer the checkpoint was trained with)")
    ap.add_argument("--max-length", type=count_at_least(0), default=None, help=MAX_LENGTH_HELP)
    ap.add_argument("--max-response-length", type=count_at_least(0), default=None, help=MAX_RESPONSE_HELP)
    ap.add_argument("--seq-length", type=count_at_least(0), default=0,
                    help="packed sequence length (default: each chunk's longest group, rounded up to 128)")
    ap.add_argument("--tp", type=count_at_least(1), default=1,
                    help="tensor-parallel size (the world size divided by tp x pp is data parallel)")
    ap.add_argument("--pp", type=count_at_least(1), default=1, help="pipeline-parallel size")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="auto: bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--nproc", type=count_at_least(1), default=1,
                    help="processes on this machine (`polar score` runs torchrun when > 1; under torchrun it is the "
                         "world size)")
    ap.add_argument("--progress-s", type=float, default=30.0,
                    help="seconds between progress lines while scoring (default 30; 0: after every schedule call)")
    ap.add_argument("--chunk-lines", type=count_at_least(0), default=0,
                    help="input lines scored and written at a time: what a stopped run can lose, and what the "
                         "host holds twice (default: 1024 per data-parallel rank, at most 16384)")
    ap.add_argument("--on-error", default="fail", choices=("fail", "skip"),
                    help="a bad input line stops the run (fail) or becomes an error line (skip)")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="read, tokenize and pack each chunk only after the one before it is scored, in the main "
                         "thread (default: on a second thread while it is scored): one thread, for a debugger or "
                         "profiler; the rows are the same")
    args = ap.parse_args(argv)
    from polar.client_limits import usage_check

    usage_check(ap, args.max_length, args.max_response_length)
    return args


def pin_setting() -> bool:
    """POLAR_SCORE_PIN_MEMORY: 1 (the default) packs a CUDA run's batches in pinned host memory, 0 in
    pageable memory (CheckpointScorer.pins_batches says why)."""
    value = os.environ.get(PIN_ENV, "1")
    if value not in ("0", "1"):
        raise ConfigError(f"{PIN_ENV}={value!r}: 1 (the default: a CUDA run's packed batches in pinned host "
                          "memory) or 0 (in pageable memory)")
    return value == "1"


def tokenizer_spec(explicit: str, step_dir: str) -> str:
    from polar.checkpoint_tokenizer import TokenizerMismatch, TokenizerNotFound, choose

    try:
        return choose(explicit or None, step_dir, "--tokenizer")
    except TokenizerNotFound as e:
        raise ConfigError(f"{e} with --tokenizer") from None
    except TokenizerMismatch as e:
        raise ConfigError(str(e)) from None


def lcp_group(ids: list):
    """One engine Group over a line's outputs: their longest common id prefix held once; every
    candidate keeps at least its last token (the reward token, where its reward is read)."""
    import numpy as np

    from engine.packing import Group

    n = min(len(x) for x in ids) - 1
    for x in ids[1:]:
        diff = np.flatnonzero(x[:n] != ids[0][:n])
        n = int(diff[0]) if diff.size else n
    return Group(prefix=ids[0][:n], candidates=[x[n:] for x in ids], labels=None)


def writable_output(path: str, option: str, inputs: dict | None = None) -> None:
    """Found before the scoring, not after it, where an unwritable path would lose the results.
    `inputs` ({option: path}): files the run reads, which the output must not replace."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {path} is a directory; name a file")
    for name, read in (inputs or {}).items():
        if p.exists() and os.path.exists(read) and os.path.samefile(p, read):
            raise ConfigError(f"{option} {path} is the {name} file: the results would replace what they were "
                              "computed from; name another file")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot create its directory ({e})") from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"{option} {path}: not writable")


class SplitLine:
    """A line's outputs as several groups, when together they do not fit one packed sequence (n
    rollouts of one prompt, each short): `parts[j]` scores the outputs `members[j]` (their indices in
    the line). Each output still attends to exactly its own prompt, reference and text, so its
    reward is the one it gets in a single group. `len()` is its longest part: what one packed
    sequence must hold."""

    def __init__(self, parts: list, members: list):
        self.parts, self.members = parts, members
        self.outputs = sum(len(m) for m in members)

    def __len__(self) -> int:
        return max(len(g) for g in self.parts)


def line_groups(ids: list, max_tokens: int):
    """The Group of a line's outputs (lcp_group), or a SplitLine when that group holds more than
    `max_tokens` tokens: the outputs partitioned as `polar serve` does (polar.serve.grouping), into
    groups that each fit and share as much prefix as they can. A single output longer than
    `max_tokens` stays alone (and is refused by score_groups, naming its line)."""
    import numpy as np

    from polar.serve.grouping import group_items

    group = lcp_group(ids)
    if not max_tokens or len(group) <= max_tokens or len(ids) == 1:
        return group

    # min_prefix=1: every output of a line shares at least BOS, prompt and reference; the serve
    # default (32) is there to avoid grouping unrelated items from different requests
    split = group_items([np.asarray(x, dtype=np.int32) for x in ids], max_tokens, min_prefix=1)
    members = [list(g.items) for g in split]
    return SplitLine([lcp_group([ids[i] for i in m]) for m in members], members)


class CheckpointScorer:
    """An engine checkpoint loaded at a TP x PP x DP layout, scoring lists of outputs that share a
    prompt and reference. Every rank builds the same inputs; the packed sequences are split over the
    data-parallel ranks and the rewards come back to every rank in input order."""

    def __init__(self, checkpoint_path: str, tokenizer: str = "", tp: int = 1, pp: int = 1,
                 precision: str = "auto", max_length: int | None = None, max_response_length: int | None = None):
        from engine import checkpoint, checkpoint_model
        from polar.tokenizer import load_tokenizer

        self.pin_memory = pin_setting()  # for pins_batches; first: a bad value stops before any file is read
        try:
            self.step_dir = checkpoint.resolve(checkpoint_path)
        except checkpoint.CheckpointNotFound as e:
            raise ConfigError(f"--checkpoint {checkpoint_path}: {e}") from None
        self.model_cfg = checkpoint_model.model_config(self.step_dir)
        self.tokenizer_spec = tokenizer_spec(tokenizer, self.step_dir)
        try:
            self.tokenizer = load_tokenizer(self.tokenizer_spec)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--tokenizer {self.tokenizer_spec}: {e}") from e
        if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer ({self.tokenizer_spec}) has {self.tokenizer.vocab_size} ids, the "
                              f"model's vocabulary only {self.model_cfg.vocab_size}: pass the tokenizer the model "
                              "was trained with (--tokenizer)")
        from polar.client_limits import settle_lengths

        # from the model's settings, before any weight is read: a --max-length whose items pass the
        # model's positions stops here, not at the first such line minutes after the load
        try:
            self.max_length, self.max_response_length, note = settle_lengths(
                max_length, max_response_length, self.tokenizer, self.model_cfg.max_position_embeddings)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if note and int(os.environ.get("RANK", "0")) == 0:
            print(note, flush=True)
        self.cuts = None  # set by groups()
        self.tp, self.pp, self.precision = tp, pp, precision
        self.rt = None

    def start(self) -> None:
        """Process groups, model, weights (the expensive part; after the inputs are checked)."""
        self.start_runtime()
        self.load()

    def start_runtime(self) -> None:
        """The process groups (seconds, not the load's minutes): made before the load so that the
        ranks can share the checks of the input that come before it (polar/score_length_check.py)."""
        from engine.config import ParallelConfig, TrainConfig
        from engine.runtime import init_runtime, validate_layout, world_size_from_env

        par = ParallelConfig(tp=self.tp, pp=self.pp, distributed_optimizer=False)
        world = world_size_from_env()
        if world % (self.tp * self.pp):  # validate_layout says it in settings a scoring user never wrote
            n = self.tp * self.pp
            raise ConfigError(f"--tp {self.tp} x --pp {self.pp}: a model replica spans {n} processes, but this "
                              f"run has {world}; start {n} (or a multiple): --nproc {n} (torchrun: "
                              f"--nproc_per_node {n})")
        self.dp = validate_layout(self.model_cfg, par, TrainConfig(global_batch=max(1, world // (self.tp * self.pp))),
                                  world, 128)
        self.rt = init_runtime(par, seed=0)

    def load(self) -> None:
        """The model and its weights, after start_runtime."""
        from engine import checkpoint_load
        from engine.config import ParallelConfig, TrainConfig
        from engine.parallelize import build_model

        if self.rt.is_main:  # minutes at 7B, with nothing else said
            print(f"loading {self.step_dir} at tp={self.tp} pp={self.pp} dp={self.rt.dp}", flush=True)
        par = ParallelConfig(tp=self.tp, pp=self.pp, distributed_optimizer=False)
        self.chunks, _ = build_model(self.model_cfg, par, TrainConfig(precision=self.precision), self.rt)
        checkpoint_load.load(self.step_dir, self.chunks, None)

    def check_seq_length(self, seq_length: int) -> None:
        """An explicit packed length, checked before any process group is made."""
        m = self.model_cfg
        if seq_length and m.rope_scaling == "dynamic" and seq_length > m.max_position_embeddings:
            raise ConfigError(f"--seq-length {seq_length} is past the model's {m.max_position_embeddings} positions, "
                              "beyond which its dynamic RoPE scaling (model.rope_scaling=dynamic) is not exact; "
                              f"pass at most {m.max_position_embeddings}")

    def encoded(self, item_lists: list) -> list:
        """Per list of ScoringItems: the client's exact ids of each item (an int32 array each). What the
        client's truncation cut is left in self.cuts."""
        from polar.client_format import Cuts, client_encode_batch

        flat = [it for items in item_lists for it in items]
        self.cuts = Cuts()
        served = client_encode_batch(self.tokenizer, flat, max_length=self.max_length,
                                     max_response_length=self.max_response_length, cuts=self.cuts)
        out, k = [], 0
        for items in item_lists:
            out.append([s.ids for s in served[k:k + len(items)]])
            k += len(items)
        return out

    def groups(self, item_lists: list, max_tokens: int = 0) -> list:
        """Per list of ScoringItems: the client's exact ids of each, as one Group, or as a SplitLine
        of several when one would hold more than `max_tokens` (default: the model's positions).
        What the client's truncation cut is left in self.cuts."""
        cap = min(max_tokens or self.model_cfg.max_position_embeddings, self.model_cfg.max_position_embeddings)
        return [line_groups(ids, cap) for ids in self.encoded(item_lists)]

    def score_groups(self, lines: list, seq_length: int = 0, where=None, progress_s: float | None = None,
                     progress=None, data_parallel: bool = True) -> tuple[list, dict]:
        """Rewards (list of floats per line, in its outputs' order) and packing facts, for lines as
        groups() gives them (a Group or a SplitLine each); `where(i)` names line i in errors;
        `progress_s`: seconds between progress lines (None: none), or `progress(done, total)` called
        with the packed sequences scored so far (engine.scoring.score's). With `data_parallel` every
        rank passes the same lines and the packed sequences are split over the DP ranks; without it
        each model replica scores the lines it is given, alone. pack() then score_packed()."""
        if progress is None and progress_s is not None:
            from engine.progress import scoring_progress

            progress = scoring_progress(progress_s, self.rt.is_main, self.rt.dp)
        return self.score_packed(self.pack(lines, seq_length, where), progress, data_parallel)

    def pins_batches(self) -> bool:
        """Whether pack() puts its batches in pinned host memory: where the model runs on a CUDA device
        (after start()), unless POLAR_SCORE_PIN_MEMORY=0. engine.scoring copies each batch to the
        device with non_blocking=True, which is asynchronous only from pinned memory: from pageable
        memory the host itself copies the bytes through the driver's staging buffer and, past that
        buffer's size, waits for the device to drain it behind the forward passes queued before."""
        rt = getattr(self, "rt", None)
        return rt is not None and rt.is_cuda and self.pin_memory

    def pack(self, lines: list, seq_length: int = 0, where=None, pin: bool | None = None) -> "Packed":
        """score_groups' host part (no model, no process group): the lines' groups planned into
        packed sequences and collated, so a thread can pack lines while the model scores others.
        A group past the packed length is a ConfigError naming its line (`where(i)`). `pin`: the
        batches in pinned host memory (default: pins_batches()), on the thread that packs, where the
        copy into it overlaps the device's work."""
        import numpy as np

        from engine.packing import collate, plan_sequences

        # a Group is a SplitLine of one part holding every output in order: one path for both
        splits = [line if isinstance(line, SplitLine) else SplitLine([line], [range(len(line.candidates))])
                  for line in lines]
        groups = [g for s in splits for g in s.parts]
        owner = [i for i, s in enumerate(splits) for _ in s.parts]  # the line each group comes from
        name = where or (lambda i: f"line {i}")
        lengths = np.array([len(g) for g in groups], dtype=np.int64)
        longest = int(lengths.max()) if len(lengths) else 1
        # rounded up to 128, but never wider than the model's positions: a dynamic-RoPE model
        # refuses a packed row past them even when each group in it is shorter
        seq = seq_length or max(longest, min(-(-longest // 128) * 128, self.model_cfg.max_position_embeddings))
        if longest > seq:
            from polar.score_length_check import too_long_message

            # split lines (line_groups) leave a part this long only for one output; a Group given whole may hold more
            over, bound = groups[int(lengths.argmax())], f"the packed sequence length {seq}"
            why = (too_long_message(longest, bound) if len(over.candidates) == 1 else
                   f"its {len(over.candidates)} outputs take {longest} tokens together, more than {bound}")
            raise ConfigError(f"{name(owner[int(lengths.argmax())])}: {why}")
        if longest > self.model_cfg.max_position_embeddings:
            raise ConfigError(f"{name(owner[int(lengths.argmax())])}: {longest} tokens, more than "
                              f"model.max_position_embeddings={self.model_cfg.max_position_embeddings}")
        # best fit, not input order: score_packed maps the rewards back through `order` whatever the
        # plan, and a chunk's plan is a pure function of its lines (a resumed run's chunks are the
        # stopped run's), so only the row count changes: 1.13-1.31x fewer rows on mixed lengths
        # (benchmarks/score_pack.py), as polar serve packs its rows (polar/serve/batcher.py)
        plan = plan_sequences(lengths, seq, method="best_fit")
        batches = [collate([[groups[g] for g in p]], seq, self.tokenizer.pad_id) for p in plan]
        if pin or (pin is None and self.pins_batches()):
            import torch

            # the current CUDA device is per thread: pinned from a thread left on device 0, every rank
            # of a node would make a CUDA context on GPU 0
            with torch.cuda.device(self.rt.device if getattr(self, "rt", None) is not None else None):
                batches = [b.pin_memory() for b in batches]
        # collate numbers candidates sequence by sequence, group by group
        order = np.concatenate(plan) if plan else np.zeros(0, dtype=np.int64)
        per_group = np.array([len(groups[g].candidates) for g in order], dtype=np.int64)
        facts = {"sequences": len(batches), "seq_length": seq, "outputs": int(per_group.sum()),
                 "prefix_tokens_saved": int(sum(len(g.prefix) * (len(g.candidates) - 1) for g in groups))}
        return Packed(splits, batches, order.tolist(), per_group.tolist(), facts)

    def score_packed(self, packed: "Packed", progress=None, data_parallel: bool = True) -> tuple[list, dict]:
        """score_groups' model part, for what pack() made: rewards per line and the packing facts."""
        from engine.scoring import rewards_per_group

        rewards = self._rewards(packed.batches, progress, data_parallel)
        out, scored = [], iter(rewards_per_group(rewards, packed.order, packed.candidates))
        for s in packed.splits:
            line_rewards = [None] * s.outputs
            for members, group_rewards in zip(s.members, scored):
                for m, r in zip(members, group_rewards):
                    line_rewards[m] = r
            out.append(line_rewards)
        return out, packed.facts

    def _rewards(self, batches: list, progress, data_parallel: bool):
        """The model's reward of every candidate of `batches`, in collate's order, on the host."""
        from engine.scoring import score, score_data_parallel

        scoring = score_data_parallel if data_parallel else score
        return scoring(self.chunks, batches, self.rt, progress=progress).cpu()


class Packed:
    """Lines packed for the model (CheckpointScorer.pack): the lines as SplitLines, the collated
    batches, the group of each place in collate's order and its candidate count, the packing facts."""

    def __init__(self, splits: list, batches: list, order: list, candidates: list, facts: dict):
        self.splits, self.batches, self.order, self.candidates, self.facts = splits, batches, order, candidates, facts


def main(argv=None, prog: str | None = None) -> int:
    """`prog`: the name in the usage and errors, default how this entry was called (engine.called_as:
    `polar score` under polar, else the path typed or `python -m engine.score`)."""
    from engine.called_as import called_as

    prog = called_as("engine.score", prog)
    args = parse_args(argv, prog)
    rank = int(os.environ.get("RANK", "0"))
    from engine.cuda_env import order_tp_launches
    from engine.quiet import silence_known_warnings

    order_tp_launches(args.tp)  # before the first CUDA call
    silence_known_warnings()
    from engine.interrupt import exit_status
    from polar.score_run import run

    leaves = ["before the scoring began; the same command starts it"]  # what a stop leaves, kept up to date
    return exit_status(lambda interrupts: run(args, interrupts, leaves), leaves, rank == 0, prog)


if __name__ == "__main__":
    sys.exit(main())
