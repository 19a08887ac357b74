"""POLAR's second stage: fine-tuning a pre-trained policy discriminator on a little preference data.

Paper Sec. 3 (Eq. 8): human-ranked responses A > B > C for a prompt give the reference A, the chosen
B and the rejected C, and the same Bradley-Terry loss as pre-training,
    L = -log sigmoid(r(p, A, B) - r(p, A, C)).
Records are the official JSONL records (`{"prompt", "reference", "chosen", "rejected", "wrapper"}`,
strings or message lists; polar/records.py validates them with file:line: field errors). The
paper's fine-tuning settings are the defaults here: AdamW betas (0.9, 0.95), weight decay 0,
gradient clipping 1.0, 3% warm-up then cosine to 0.1 x lr, one epoch, lr 1e-5 (POLAR-1.8B; 2e-5
for 7B). The batch is NOT the paper's by default: the paper's batch of 320 sequences is 160 records
(each record is scored twice), while `train.global_batch` (default 8, small enough for a CPU run)
counts packed sequences, each holding as many records as fit. The run prints at start-up
(`--check-config` too; under `polar finetune` its start-up check alone, _say), the records and RM
sequences a step carries on its data and the `train.global_batch` that carries the paper's 160 records.

`train.steps` and `train.warmup_steps` are derived from the data (`finetune.epochs`,
`finetune.warmup_fraction`); setting them is refused rather than silently overwritten. With
ceil(epochs x sequences / global_batch) steps every sequence of the requested epochs is trained,
and the last batch is topped up from the next epoch's order (engine.data: one continuous stream).

The run starts from `checkpoint.init_from` (a pre-training run's checkpoint, or one made by
`polar convert hf-to-engine`), whose recorded model.* settings it takes unless given
(engine.start_checks.model_from_checkpoint), holds out `finetune.eval_fraction` of the records, whole prompts
at a time (polar.finetune_split; or reads `finetune.eval`), and evaluates on them every
`train.eval_interval` steps and at the end. Same engine, layouts, logging, checkpoints and exact
resume as pre-training (engine/pretrain.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np

from engine.config import DataConfig, EngineConfig, TrainConfig
from engine.setting_checks import (ConfigError, at_least, existing_path_or_empty, in_range, one_of, positive,
                                   run_directory, setting)
from polar.build_repeats import SHOWN, first_of, named
from polar.finetune_split import SPLIT_RULE, where
from polar.pretrain_recipe import RunData

CLI = {"description": "POLAR reward-model fine-tuning on preference records "
       "(paper Sec. 3, Eq. 8; run under torchrun, a plain single process works too).",
       # the presets set train.steps, which fine-tuning derives from finetune.epochs: they are refused
       "config_help": "a YAML file of settings (no train.steps or train.warmup_steps); the model.* settings "
                      "checkpoint.init_from records are taken from it, and one given here must match it"}


def _existing_file_or_empty(where, v):
    existing_path_or_empty(where, v)
    if v and Path(v).is_dir():
        raise ConfigError(f"{where}={v}: is a directory; name a JSONL file of records")


_existing_file_or_empty.rule = "empty, or an existing JSONL file"


def _existing_file(where, v):
    if not v:
        raise ConfigError(f"{where}: name the training records (a JSONL file)")
    _existing_file_or_empty(where, v)


_existing_file.rule = "an existing JSONL file"


def _tokenizer_setting(where, v):
    if v != "byte":
        existing_path_or_empty(where, v)


_tokenizer_setting.rule = "empty, \"byte\", or an existing tokenizer directory"


@dataclass
class FinetuneDataConfig:
    train: str = setting("", _existing_file)  # official JSONL preference records
    eval: str = setting("", _existing_file_or_empty)  # held-out records; empty: split off eval_fraction
    eval_fraction: float = setting(0.05, in_range(0.0, 0.5))
    # "byte", or a directory holding tokenizer.json; empty: the tokenizer the init checkpoint was
    # trained with (polar.checkpoint_tokenizer.find)
    tokenizer: str = setting("", _tokenizer_setting)
    max_length: int = setting(16384, at_least(8))  # POLAR's input budget (paper App. D)
    max_response: int = setting(4096, at_least(1))
    wrapper: str = setting("sft", one_of("sft", "pretrain"))  # for records that do not name one
    epochs: float = setting(1.0, positive)  # sets train.steps from the data
    warmup_fraction: float = setting(0.03, in_range(0.0, 1.0))  # sets train.warmup_steps
    # a bad record (or one too long for the pack): stop, or skip and list it in run_dir/rejects.jsonl
    on_error: str = setting("fail", one_of("fail", "skip"))
    seed: int = setting(0, at_least(0))  # the held-out split
    # the held-out count's rule (finetune_split.HELD_OUT_COUNTS), no setting: a resumed run keeps the
    # one its checkpoints record (prepare_data), a new run takes this one
    split_rule: ClassVar[int] = SPLIT_RULE


# set by prepare_data from the data; 0 (their fine-tuning default) means not set by the user
# the settings this recipe computes from the data -> the setting the user sets instead
DERIVED_SETTINGS = {"train.steps": "finetune.epochs", "train.warmup_steps": "finetune.warmup_fraction"}


def _paper_train_defaults() -> TrainConfig:
    t = TrainConfig()
    t.steps, t.warmup_steps = 0, 0  # derived (DERIVED_SETTINGS)
    t.lr, t.min_lr_ratio, t.weight_decay = 1e-5, 0.1, 0.0
    t.adam_beta1, t.adam_beta2, t.grad_clip = 0.9, 0.95, 1.0
    t.eval_interval = 50
    return t


def _pack_length_setting(where, v):
    if v != 0:
        at_least(2)(where, v)


_pack_length_setting.rule = "0 (the pack length follows the data) or >= 2"

# data.seq_length=0, fine-tuning's default: the pack length follows the data. POLAR's rule
# (finetune.max_length, finetune.max_response) already bounds every record: a pair is stored as its
# prompt twice, the reference and both candidates, so within a few tokens of max_length +
# max_response (some 20.5k at the defaults), polar/format.py. A fixed default pack shorter than that
# refused records the rule accepts (with finetune.on_error=fail one 1,880-character record stopped a
# run at 1024) and could only advise raising it to the longest record. Packing fills a longer pack
# with several shorter records, so little is wasted, but activation memory grows with the pack: it
# is the longest record's length in whole PACK_UNITs (of tokens, and of parallel.tp for sequence
# parallelism), never less than PACK_FLOOR, the fixed default of before (short records pack as they
# did). A data.seq_length the user sets is kept; records too long for it are then
# finetune.on_error's.
PACK_FLOOR, PACK_UNIT = 1024, 256


@dataclass
class FinetunePackConfig(DataConfig):
    seq_length: int = setting(0, _pack_length_setting)  # packed length; 0: from the data (PACK_FLOOR)


@dataclass
class FinetuneConfig(EngineConfig):
    train: TrainConfig = field(default_factory=_paper_train_defaults)
    data: FinetunePackConfig = field(default_factory=FinetunePackConfig)
    finetune: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    run_dir: str = setting("runs/finetune", run_directory)
    # the settings its training data is made of besides finetune.train (a file that may move: the
    # loader's digest tells another file's records), recorded with each step (engine.resume_checks)
    # (finetune.on_error changes it only where a record is bad, and the tokenizer has a check of its own)
    # finetune.split_rule: the rule of the held-out count, which a run resumed from a checkpoint
    # recording none takes as 1 (finetune_split.legacy_held_out_count)
    DATA_SETTINGS: ClassVar[tuple] = ("finetune.seed", "finetune.eval_fraction", "finetune.max_length",
                                      "finetune.max_response", "finetune.wrapper", "finetune.split_rule")


CONFIG_CLASS = FinetuneConfig
DEFAULT_PRESET = None  # no preset: the defaults above plus the command line


def tokenizer_spec(cfg: FinetuneConfig) -> str:
    """finetune.tokenizer, else the tokenizer the init checkpoint was trained with."""
    from engine.checkpoint import CheckpointNotFound, resolve
    from polar.checkpoint_tokenizer import TokenizerMismatch, TokenizerNotFound, choose

    try:
        step = resolve(cfg.checkpoint.init_from)
    except CheckpointNotFound:
        if cfg.finetune.tokenizer:
            return cfg.finetune.tokenizer  # the checkpoint checks name what is missing
        raise
    try:
        return choose(cfg.finetune.tokenizer or None, step, "finetune.tokenizer")
    except TokenizerNotFound as e:
        raise ConfigError(f"{e} with finetune.tokenizer") from None
    except TokenizerMismatch as e:
        raise ConfigError(str(e)) from None


def check(cfg: FinetuneConfig) -> None:
    from polar.tokenizer import load_tokenizer

    for name, derived_from in DERIVED_SETTINGS.items():
        value = getattr(cfg.train, name.split(".")[1])
        if value:
            raise ConfigError(f"{name}={value}: fine-tuning derives it from the data and {derived_from}; set that "
                              f"instead (a --config preset's train section sets it too: pass a model section only)")
    given = [f"data.{name}={value}" for name, value in (("path", cfg.data.path), ("eval_path", cfg.data.eval_path))
             if value]
    if given:
        # a built dataset would be trained on by nothing here: the records come from finetune.* alone
        raise ConfigError(f"{', '.join(given)}: fine-tuning reads its records from finetune.train (and "
                          "finetune.eval), not a built dataset; drop it (a --config holding a data section sets "
                          "it too: pass a model section only)")
    f = cfg.finetune
    if f.eval and f.eval_fraction not in (0.0, FinetuneDataConfig().eval_fraction):
        # the held-out records are finetune.eval's and the whole training file trains: a fraction asked
        # for was dropped without a word (the default cannot be told from one given, and holds out nothing)
        raise ConfigError(f"finetune.eval_fraction={f.eval_fraction:g} with finetune.eval={f.eval}: the held-out "
                          "records are finetune.eval's, and no part of finetune.train is held out; give one of the "
                          "two (finetune.eval_fraction=0 or left out with finetune.eval)")
    if f.eval and f.train and os.path.samefile(f.eval, f.train):
        # every held-out record would be one trained on: an accuracy that measures nothing, reported as held out
        raise ConfigError(f"finetune.eval={f.eval} is the finetune.train file: name records not trained on, or "
                          "leave finetune.eval empty to hold out finetune.eval_fraction of finetune.train")
    if not cfg.checkpoint.init_from:
        raise ConfigError("checkpoint.init_from: fine-tuning starts from a pre-trained checkpoint; name one "
                          "(a run's checkpoints/ directory, one step, or a `polar convert` output)")
    _refuse_another_recipes_run(cfg)
    spec = tokenizer_spec(cfg)
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"finetune.tokenizer={spec}: {e}") from e
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} ({spec}){_resumed_not_init(cfg)}")


def _refuse_another_recipes_run(cfg: FinetuneConfig) -> None:
    """ConfigError where the run would resume a step that a pre-training run saved (run_dir naming
    that run, the one checkpoint.init_from is often of): its data settings record the embedded data's
    synthetic.* or a built dataset's data.path, which fine-tuning never has (a fine-tuning step records
    finetune.*, or data.* alone where saved before those were recorded). The resume was refused only by
    its optimizer settings ("train.lr=0.002 when saved, 1e-05 now ... set them back"), advice that
    leads to resuming a pre-training run on preference records."""
    from engine.checkpoint import read_state
    from engine.start_checks import newest_checkpoint

    step = newest_checkpoint(cfg) if cfg.checkpoint.resume else None
    state = read_state(step) if step else {}
    saved = state.get("data_settings")
    if "loader" not in state or not isinstance(saved, dict) or not (
            saved.get("data.path") or any(k.startswith("synthetic.") for k in saved)):
        return  # a new run, a fine-tuning run's step, or one that records nothing to tell
    kinds = ", ".join(sorted({f"{k.split('.')[0]}.*" for k in saved}))
    built = f", data.path={saved['data.path']}" if saved.get("data.path") else ""
    raise ConfigError(f"run_dir={cfg.run_dir}: its newest step, {step}, is a pre-training run's (its data settings "
                      f"are {kinds}{built}), which fine-tuning does not resume: give the fine-tuning run a run_dir "
                      f"(or checkpoint.dir) of its own, with checkpoint.init_from={step} to start from its weights")


def _resumed_not_init(cfg: FinetuneConfig) -> str:
    """Where the run resumes a step of its own checkpoint directory (an earlier run in run_dir), the
    model it builds is that step's (engine.start_checks.model_from_checkpoint), not checkpoint.init_from's,
    while the tokenizer is still init_from's: what to say of it ("" for a run that does not resume)."""
    from engine.checkpoint import CheckpointNotFound, resolve, run_checkpoint_dir
    from engine.start_checks import newest_checkpoint

    resumed = newest_checkpoint(cfg) if cfg.checkpoint.resume else None
    if resumed is None:
        return ""
    with contextlib.suppress(CheckpointNotFound):
        if Path(resolve(cfg.checkpoint.init_from)).resolve() == Path(resumed).resolve():
            return ""
    # checkpoint.resume=false is no way out: a run refuses a checkpoint directory that holds steps
    return (f": the run resumes {resumed}, the newest step in {run_checkpoint_dir(cfg)} (an earlier run in "
            f"run_dir={cfg.run_dir}), and builds the model that step holds; checkpoint.init_from="
            f"{cfg.checkpoint.init_from} is loaded only by a run that has no step to resume. To fine-tune from it, "
            "give a new run_dir (or checkpoint.dir); to go on with the earlier run, give the checkpoint.init_from "
            "it started from")


def _say(*args, **kw) -> None:
    """What prepare_data says of the data. Every rank reads the same records; one of them reports, each
    line once in a `polar finetune` launch, whose start-up check (a process of its own) and run both
    read the data (engine.pretrain.first_said): it printed each line twice."""
    from engine.pretrain import first_said

    if int(os.environ.get("RANK", "0")) == 0 and first_said(kw.get("sep", " ").join(map(str, args))):
        print(*args, **kw)


REJECTS_FILE = "rejects.jsonl"  # in run_dir: every record finetune.on_error=skip set aside, with its reason


def _read(path: str, on_error: str, set_aside: Optional[list] = None):
    from polar.records import RecordError, read_records

    rejects: list = []
    try:
        records = list(read_records(path, on_error=on_error, rejects=rejects))
    except RecordError as e:
        raise ConfigError(f"finetune records: {e} (finetune.on_error=skip skips bad records and reports them)") from e
    if rejects:
        _say(f"{path}: skipped {len(rejects)} bad record(s), e.g. {rejects[0]['file']}:{rejects[0]['line']}: "
             f"{rejects[0]['field']}: {rejects[0]['reason']}", flush=True)
        if set_aside is not None:
            set_aside += rejects
    if not records:
        raise ConfigError(f"{path}: no usable record")
    return records


def _encode(cfg: FinetuneConfig, tok, records):
    """(the records' encodings, their groups, each group's length); a prompt is cut further where its
    group would not fit data.seq_length (not while that is 0: the length follows the groups)."""
    from engine.packing import Group
    from polar.format import encode_groups

    f = cfg.finetune
    encoded = encode_groups(tok, [r.prompt for r in records], [r.reference for r in records],
                            [r.candidates for r in records], [r.wrapper or f.wrapper for r in records],
                            max_length=f.max_length, max_response=f.max_response,
                            group_capacity=cfg.data.seq_length)
    groups = [Group(prefix=e.prefix, candidates=list(e.candidates), labels=np.asarray(r.labels, dtype=np.int8))
              for e, r in zip(encoded, records)]
    return encoded, groups, np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))


def _fit_pack_length(cfg: FinetuneConfig, sets: dict) -> None:
    """data.seq_length=0: the length of the longest group of `sets` (name -> (records, _encode's)), in
    whole units (PACK_UNIT above)."""
    unit = math.lcm(PACK_UNIT, cfg.parallel.tp)
    longest, record = max(((int(lengths.max()), records[int(np.argmax(lengths))])
                           for records, (_, _, lengths) in sets.values()), key=lambda found: found[0])
    cfg.data.seq_length = -(-max(longest, PACK_FLOOR) // unit) * unit
    _say(f"data.seq_length={cfg.data.seq_length} from the data: the longest record, {record.file}:{record.line}, "
         f"is {longest} tokens as one group (whole {unit}-token units, at least {PACK_FLOOR}); set data.seq_length "
         "for another pack length (a longer pack holds more records and more activation memory)", flush=True)


def derived_pack_length(cfg: FinetuneConfig, tok) -> int:
    """The data.seq_length a run left at 0 derives (prepare_data): the longest group of finetune.train and
    finetune.eval together, rounded as _fit_pack_length rounds; sets it in `cfg` and prints the run's line.
    For a caller that plans the run without running it (polar plan)."""
    f = cfg.finetune
    records = [r for path in (f.train, f.eval) if path for r in _read(path, f.on_error)]
    _fit_pack_length(cfg, {"records": (records, _encode(cfg, tok, records))})
    return cfg.data.seq_length


def _pack(cfg: FinetuneConfig, tok, records, name: str, set_aside: Optional[list] = None, encoded=None):
    """`encoded`: _encode's for the records, at the run's data.seq_length."""
    from engine.data import PackedGroups

    f = cfg.finetune
    encoded, groups, lengths = encoded or _encode(cfg, tok, records)
    seq = cfg.data.seq_length
    over = np.flatnonzero(lengths > seq)
    if over.size:
        # even with its prompt cut to nothing beyond the rule, the reference and candidates alone
        # overflow the pack: a group is never split, so the record cannot train at this length
        shown = first_of((f"{records[i].file}:{records[i].line} ({lengths[i]} tokens)" for i in over[:SHOWN]),
                         over.size)
        what = (f"{name}: {over.size} record(s) do not fit data.seq_length={seq} as one group even with a "
                f"shorter prompt: {shown}; raise data.seq_length to "
                f"{lengths.max()} (or leave it out: 0, the longest record's length) or lower "
                f"finetune.max_response={f.max_response}")
        if f.on_error != "skip":
            raise ConfigError(f"{what} (finetune.on_error=skip sets them aside)")
        _say(f"{what}; skipped (finetune.on_error=skip)", flush=True)
        if set_aside is not None:
            set_aside += [{"file": records[i].file, "line": records[i].line, "field": "(record)",
                           "reason": f"{lengths[i]} tokens as one group, more than data.seq_length={seq}"}
                          for i in over.tolist()]
        fits = lengths <= seq
        groups = [g for g, ok in zip(groups, fits) if ok]
        encoded = [e for e, ok in zip(encoded, fits) if ok]
        if not groups:  # nothing left to train or evaluate on: an empty set would report 0 pairs as 0.0
            raise ConfigError(f"{name}: none of its {len(records)} record(s) fits data.seq_length={seq}; raise "
                              f"data.seq_length to {lengths.max()} or lower finetune.max_response={f.max_response}")
        records = [r for r, ok in zip(records, fits) if ok]  # beside `encoded`, which the notes below name
    # the cut records are named, the first SHOWN of them: by counts alone a user could not tell which of
    # the data's records trained on a part of their text
    responses_cut, prompts_cut = sum(e.responses_cut for e in encoded), sum(e.prompt_cut for e in encoded)
    if responses_cut or prompts_cut:  # the rule's own cuts: not errors, but the model never sees what they cut
        total = sum(1 + len(e.candidates) for e in encoded)
        cut = [r for r, e in zip(records, encoded) if e.responses_cut or e.prompt_cut]
        _say(f"{name}: truncation (POLAR's rule) {responses_cut} of {total} responses cut to their first "
             f"finetune.max_response={f.max_response} ids, BOS counted ({max(f.max_response - 1, 0)} tokens of text), "
             f"{prompts_cut} prompts to their last tokens within "
             f"finetune.max_length={f.max_length}, in {len(cut)} record(s): {where(cut)}", flush=True)
    shortened = [(r, e.prompt_cut_to_fit) for r, e in zip(records, encoded) if e.prompt_cut_to_fit]
    if shortened:
        # a group is packed whole: its prompt (stored twice) gives way before the record is lost
        _say(f"{name}: {len(shortened)} record(s) too long for data.seq_length={seq} as one "
             f"group kept a shorter prompt ({sum(n for _, n in shortened)} prompt tokens beyond finetune.max_length's "
             f"rule): {where([r for r, _ in shortened])}", flush=True)
    try:
        return PackedGroups(groups, seq, method=cfg.data.packing)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from e


def _note_overlap(train_records, eval_records) -> None:
    """A held-out file sharing prompts or records with the training file: its accuracy is partly seen."""
    from polar.finetune_split import overlap

    same, copies = overlap(train_records, eval_records)
    if same:
        pairs = named(len(copies), [(f"{h.file}:{h.line}", f"{t.file}:{t.line}") for h, t in copies[:SHOWN]])
        rep = f", {len(copies)} of them a copy of one ({pairs})" if copies else ""
        _say(f"note: {same} of {len(eval_records)} finetune.eval record(s) share their prompt with a finetune.train "
             f"record{rep}: their accuracy is not held out", flush=True)


def _split_rule(cfg: FinetuneConfig) -> tuple[int, str]:
    """(the held-out count's rule for this run, the step it resumes from or ""): the rule a resumed
    run's checkpoints record; 1 where they record none (written before the rule was recorded, when
    round() counted: finetune_split.legacy_held_out_count), so that such a run resumes on the split it
    trained with instead of being refused for a data order it cannot set back; SPLIT_RULE for a new run."""
    from engine.checkpoint import read_state
    from engine.start_checks import newest_checkpoint
    from polar.finetune_split import HELD_OUT_COUNTS

    step = newest_checkpoint(cfg) if cfg.checkpoint.resume else None
    state = read_state(step) if step else {}
    if "loader" not in state:  # a new run (a weights-only step is no resume: the trainer refuses it)
        return SPLIT_RULE, ""
    saved = state.get("data_settings")
    rule = saved.get("finetune.split_rule", 1) if isinstance(saved, dict) else 1
    if rule not in HELD_OUT_COUNTS:
        raise ConfigError(f"resuming from {step}: its held-out split follows rule {rule} (finetune.split_rule in "
                          f"its data settings), which this version does not know (it knows "
                          f"{', '.join(map(str, HELD_OUT_COUNTS))}): resume with the version that wrote it, or "
                          f"start a new run (a new run_dir) from its weights with checkpoint.init_from={step}")
    return rule, step


def _note_old_split(f: FinetuneDataConfig, records: int, resumed: str) -> None:
    """A run resumed under the old held-out count (_split_rule) where the rule of today counts otherwise."""
    from polar.finetune_split import HELD_OUT_COUNTS

    then, now = (HELD_OUT_COUNTS[rule](f.eval_fraction, records) for rule in (f.split_rule, SPLIT_RULE))
    if then != now:
        _say(f"note: {resumed} is of a run started before the held-out count's rule changed: it resumes on the "
             f"split it trained with, round({f.eval_fraction:g} x {records}) = {then} record(s) aimed at, where a "
             f"new run aims at {now} (the fraction rounded down, one at least)", flush=True)


def _layout_for(sequences: int, par, micro: int, dp: int, global_batch: int) -> str:
    """The changes together that let `sequences` fill one step of this layout (global_batch_unit), each
    only where it is needed: a smaller micro_batch alone could still leave every rank's share past the
    data, and with interleaved pipelining no micro_batch takes fewer than parallel.pp sequences a rank.
    The train.global_batch the changed layout takes is among them: named apart, the run that followed
    the rest was refused again for a batch larger than the data."""
    group = par.pp if par.vpp is not None else 1  # micro-batches a rank takes together a step
    changes = []
    if sequences < group:
        changes.append(f"parallel.vpp=none (interleaved pipelining takes micro-batches in groups of "
                       f"parallel.pp={par.pp})")
        group = 1
    if sequences < group * micro:  # one rank's share alone is past the data: keep the ranks where a micro_batch can
        micro = max(1, sequences // (group * dp))
        changes.append(f"train.micro_batch={micro}")
    ranks = min(dp, sequences // (group * micro))
    if ranks < dp:
        changes.append(f"fewer processes (--nproc {par.tp * par.pp * ranks} at most)")
    unit = ranks * group * micro
    if global_batch > sequences or global_batch % unit:
        changes.append(f"train.global_batch={sequences // unit * unit}")
    return " with ".join(changes)


def prepare_data(cfg: FinetuneConfig) -> RunData:
    """Every rank reads and encodes the same records (deterministic), so nothing is broadcast."""
    from polar.finetune_split import repeats_note, split_by_prompt, unrankable
    from polar.tokenizer import load_tokenizer

    t0 = time.time()
    f = cfg.finetune
    held_desc = ""
    f.split_rule, resumed = _split_rule(cfg)  # recorded with the run's checkpoints (DATA_SETTINGS)
    spec = tokenizer_spec(cfg)
    tok = load_tokenizer(spec)
    set_aside: list = []  # finetune.on_error=skip: listed in run_dir/REJECTS_FILE
    records = _read(f.train, f.on_error, set_aside)
    if f.eval:
        train_records, eval_records = records, _read(f.eval, f.on_error, set_aside)
        _note_overlap(train_records, eval_records)
    else:
        split = split_by_prompt(records, f.eval_fraction, f.seed, f.split_rule)
        train_records = [r for r, h in zip(records, split.held) if not h]
        eval_records = [r for r, h in zip(records, split.held) if h]
        if f.eval_fraction > 0 and not eval_records:  # only "0 held out" in the data line said so
            # a fraction above 0 holds out one record at least (finetune_split.held_out_count): none
            # only where a whole prompt cannot be spared
            _say(f"note: finetune.eval_fraction={f.eval_fraction:g} of {len(records)} record(s) holds out none: "
                 "every record has the same prompt, records are held out by prompt, and one prompt must stay to "
                 "train on: no held-out accuracy will be reported; give finetune.eval", flush=True)
        elif eval_records:
            held_desc = f" ({split.held_prompts:,} of {split.prompts:,} prompts, held out whole)"
        if f.split_rule != SPLIT_RULE:
            _note_old_split(f, len(records), resumed)
    for name, rs in (("fine-tuning data", train_records), ("held-out data", eval_records)):
        note = repeats_note(name, rs, f.wrapper)  # a sampler's output appended to itself trains twice
        if note:
            _say(note, flush=True)
        tied = unrankable(rs)
        if tied:
            _say(f"note: {name}: {len(tied)} record(s) hold a preferred and a rejected response of the same text "
                 f"({where(tied)}): such a pair gets two equal rewards whatever the model, so it trains nothing and "
                 "its accuracy is a coin flip", flush=True)
    sets = {name: (rs, _encode(cfg, tok, rs)) for name, rs in (("fine-tuning data", train_records),
                                                                ("held-out data", eval_records)) if rs}
    if not cfg.data.seq_length:
        _fit_pack_length(cfg, sets)
    train = _pack(cfg, tok, train_records, "fine-tuning data", set_aside, sets["fine-tuning data"][1])
    evals = {"held_out": _pack(cfg, tok, eval_records, "held-out data", set_aside, sets["held-out data"][1])} \
        if eval_records else {}
    if set_aside:  # listed by write_run_files once the run starts (--check-config writes nothing)
        _say(f"{len(set_aside)} record(s) set aside (finetune.on_error=skip), each listed with its reason in "
             f"{Path(cfg.run_dir) / REJECTS_FILE} when the run starts", flush=True)
    # a batch this layout accepts: the layout check's own rule
    from engine.layout_rules import global_batch_unit
    from engine.runtime import world_size_from_env

    par, micro = cfg.parallel, cfg.train.micro_batch
    dp = max(1, world_size_from_env() // (par.tp * par.pp))
    unit = global_batch_unit(par, micro, dp)
    packed = f"the fine-tuning data packs into only {len(train)} sequences of {cfg.data.seq_length} tokens"
    if len(train) < unit:
        # no train.global_batch both fits the data and divides among the ranks (--nproc 2 on a small file)
        raise ConfigError(f"{packed}, fewer than the {unit} a step needs at least ({dp} data-parallel rank(s) x "
                          f"train.micro_batch={micro}{' x parallel.pp' if unit > dp * micro else ''}): use "
                          f"{_layout_for(len(train), par, micro, dp, cfg.train.global_batch)}, a smaller "
                          "data.seq_length (more, shorter sequences), or more records")
    if len(train) < cfg.train.global_batch:
        # what to change, since the README's own commands meet this with a small example file
        most = len(train) // unit * unit  # a multiple of the unit: the layout check refuses any other
        raise ConfigError(f"train.global_batch={cfg.train.global_batch}: {packed}: set train.global_batch to "
                          f"at most {most}{f' (a multiple of {unit}, as this layout needs)' if unit > 1 else ''}, "
                          "or a smaller data.seq_length (more, shorter sequences), or give more records")
    # sequences in the requested epochs, from the epochs as written (1.1 x 50 is 55, not the float 55.00000000000001)
    wanted = math.ceil(Fraction(repr(f.epochs)) * len(train))
    steps = max(1, math.ceil(wanted / cfg.train.global_batch))
    cfg.train.steps = steps
    cfg.train.warmup_steps = int(round(f.warmup_fraction * steps))
    extra = steps * cfg.train.global_batch - wanted
    past = f"of epoch {int(f.epochs) + 1}" if float(f.epochs).is_integer() else f"past {f.epochs:g} epoch(s)"
    fill = f" (the last batch is filled with {extra} sequence(s) {past})" if extra > 0 else ""
    # the records packed: those set aside by finetune.on_error=skip as too long are not counted
    n_held = len(evals["held_out"].groups) if evals else 0
    desc = (f"data: {len(train.groups):,} fine-tuning records -> {len(train):,} packed sequences of "
            f"{cfg.data.seq_length} tokens ({train.packing_efficiency:.1%} full), {n_held:,} held out{held_desc}; "
            f"{f.epochs:g} epoch(s) = {steps} steps{fill}, {cfg.train.warmup_steps} warm-up; "
            f"built in {time.time() - t0:.1f}s")
    # Paper Sec. 3 fine-tunes with a batch of 320 sequences: 160 records, chosen and rejected each scored
    # with the prompt and reference. train.global_batch counts packs of several records, so what a step
    # carries is the data's records a pack times it: said once, with the global_batch that carries 160.
    per_pack, gb = len(train.groups) / len(train), cfg.train.global_batch
    paper_gb = max(unit, round(160 / per_pack / unit) * unit)
    short = (f"; this data's {len(train.groups):,} records fill only {len(train):,}, less than one such batch"
             if paper_gb > len(train) else "")
    _say(f"batch: train.global_batch={gb} packed sequences carry ~{gb * per_pack:,.1f} records "
         f"(~{gb * sum(len(g.candidates) for g in train.groups) / len(train):,.1f} RM sequences) a step, "
         f"{per_pack:.2f} records a pack of this data; the paper's fine-tuning batch is 160 records (320 "
         f"sequences): train.global_batch={paper_gb} carries it"
         f"{f' (a multiple of {unit}, as this layout needs)' if unit > 1 else ''}{short}", flush=True)
    return RunData(train, evals, tok.pad_id, desc, tokenizer=None if spec == "byte" else spec, source=f.train,
                   set_aside=set_aside)


def write_run_files(cfg: FinetuneConfig, data: RunData) -> None:
    """Rank 0, once the run starts: run_dir/REJECTS_FILE lists the records this run set aside, and a
    list left by an earlier run in the same directory goes when this one sets none aside (it would
    describe other data or settings)."""
    out = Path(cfg.run_dir) / REJECTS_FILE
    if data.set_aside:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in data.set_aside)
        print(f"wrote the {len(data.set_aside)} record(s) set aside, each with its reason: {out}", flush=True)
    elif out.exists():
        out.unlink()
        print(f"removed {out} of an earlier run: this one set no record aside", flush=True)


def summarize(data: RunData, results: dict) -> tuple[dict, list[str]]:
    if "held_out" not in results:
        return {}, []
    r = results["held_out"]
    return ({"held_out_pair_accuracy": r["pair_accuracy"], "held_out_loss": r["loss"], "held_out_pairs": r["pairs"]},
            [f"held-out pair accuracy {r['pair_accuracy']:.3f} over {r['pairs']:,} pairs, loss {r['loss']:.4f}"])
