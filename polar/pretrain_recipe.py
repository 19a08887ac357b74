"""The POLAR pre-training recipe: what the run trains and evaluates on, and what its summary says.

`engine/pretrain.py` (the entry point users run) composes this recipe with the engine: the engine
knows packed token groups, this module knows where they come from. Two sources:

- the embedded default: synthetic policies (polar/synthetic.py) tokenized by the byte tokenizer,
  evaluated on held-out and seen policies next to non-learned baselines (polar/baselines.py);
- a dataset built by `polar data build` (data.path), evaluated on data.eval_path if given.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np

from engine.build_sets import ids_disagreement
from engine.config import ConfigError, EngineConfig
from engine.setting_checks import LONE_SET, named_datasets
from polar.pretrain_data import SyntheticDataConfig, SyntheticSplits


@dataclass
class PretrainConfig(EngineConfig):
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    # the synthetic settings the training data is made of (with data.path empty): a resume keeps them
    # (engine.resume_checks.data_settings). The evaluation sets' (eval_*, held_out_policies) leave the
    # training data as it is
    DATA_SETTINGS: ClassVar[tuple] = ("synthetic.seed", "synthetic.train_policies", "synthetic.train_triplets",
                                      "synthetic.prompts", "synthetic.wrapper")


CONFIG_CLASS = PretrainConfig
DEFAULT_PRESET = "tiny_cpu"  # the embedded default: a small CPU run on synthetic policies


@dataclass
class RunData:
    """What the engine trains and evaluates on, and what the summary needs of it."""

    train: object  # engine.data.PackedGroups or engine.indexed_dataset.IndexedDataset
    evals: dict  # name -> the same kind
    pad_id: int
    description: str  # one line for the log
    splits: Optional[SyntheticSplits] = None  # the embedded default's texts, for the baselines
    # the tokenizer directory the token ids came from, which the checkpoints carry
    # (polar.checkpoint_tokenizer); None for the byte tokenizer. Copied by the entry script once the
    # run is known to start: a refused resume must not replace the one its steps were trained with
    tokenizer: Optional[str] = None
    # what the run trains on, for summary.json: a built dataset's path, the fine-tuning records'
    # file; None: the embedded synthetic pool
    source: Optional[str] = None
    # records a recipe set aside (fine-tuning under finetune.on_error=skip), each with its reason;
    # written into the run directory by the recipe's write_run_files once the run starts
    set_aside: list = field(default_factory=list)


def _set_vocab(cfg: EngineConfig, vocab_size: int, source: str) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {source}'s {vocab_size}")


_OPENED: dict = {}  # (absolute path, its indexes' names, times, sizes) -> IndexedDataset


def open_built(path: str, cfg: EngineConfig, setting: str):
    """A dataset written by `polar data build`, checked against the run's settings. Opened once per
    process: opening reads every shard's per-sequence counts (version-1 shards: the whole index)."""
    from engine.indexed_dataset import IndexedDataset
    from engine.shard_format import DatasetFormatError

    p = Path(path).resolve()
    # a dataset rebuilt in place since (another run in this process) is opened again
    key = (str(p), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size)
                         for f in (sorted(p.glob("*.idx")) if p.is_dir() else [Path(f"{p}.idx")]) if f.is_file()))
    try:
        ds = _OPENED.get(key) or IndexedDataset(path)
    except (DatasetFormatError, OSError) as e:
        raise ConfigError(f"{setting}={path}: {e}") from e
    _OPENED[key] = ds
    if ds.seq_length != cfg.data.seq_length:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length}, but {setting}={path} is packed at "
                          f"{ds.seq_length}: set data.seq_length={ds.seq_length} (or rebuild the data)")
    for key in ("vocab_size", "pad_id"):
        if not isinstance(ds.meta.get(key), int):
            raise ConfigError(f"{setting}={path}: its metadata has no integer {key!r}; rebuild it with polar data build")
    return ds


def check(cfg: PretrainConfig) -> None:
    """Start-up checks of the data settings (before any process group): a built dataset's indexes
    are read, not its tokens."""
    if cfg.data.eval_path and not cfg.data.path:
        raise ConfigError("data.eval_path needs data.path (the embedded default evaluates on its own data)")
    if cfg.data.path:
        ds = open_built(cfg.data.path, cfg, "data.path")
        _set_vocab(cfg, ds.meta["vocab_size"], "dataset tokenizer")
        if len(ds) < cfg.train.global_batch:
            raise ConfigError(f"train.global_batch={cfg.train.global_batch}: data.path={cfg.data.path} holds only "
                              f"{len(ds)} packed sequences; lower train.global_batch (or build more data)")
        for name, path, setting in eval_sets(cfg):
            held = open_built(path, cfg, setting)
            if len(held) == 0:
                # its accuracy would be reported as 0.000 over 0 pairs
                raise ConfigError(f"{setting}={path} holds no packed sequences (every record rejected? see its "
                                  "build's rejects file); rebuild it, or leave it out of data.eval_path")
            _check_same_tokenizer(held, ds, f"{setting}={path}", f"data.path={cfg.data.path}")
    else:
        from polar.tokenizer import ByteTokenizer

        _set_vocab(cfg, ByteTokenizer.vocab_size, "tokenizer")
    if cfg.checkpoint.init_from:
        _check_init_tokenizer(cfg)
    _check_resume_data(cfg)


def _check_same_tokenizer(held, train, held_setting: str, train_setting: str) -> None:
    """An evaluation set's ids must mean what the training data's do: the same vocabulary size, pad and BOS
    ids (what the shards of one dataset agree on, engine.build_sets.ids_disagreement), and the same tokenizer (content
    digest) and reward token ids where both datasets record them. A set tokenized by another tokenizer of the
    same size was scored on ids that mean other tokens."""
    differs = ids_disagreement(held.meta, train.meta)
    if differs:
        key, a, b = differs
        raise ConfigError(f"{held_setting} and {train_setting} disagree on {key}: {a} vs {b} (built with different "
                          "tokenizers; build both with one)")


def _check_resume_data(cfg: PretrainConfig) -> None:
    """A resume with other data settings is refused naming them, before the data is built (whose own
    check says only that the data order changed)."""
    from engine import checkpoint, resume_checks

    try:
        step = checkpoint.latest(checkpoint.run_checkpoint_dir(cfg)) if cfg.checkpoint.resume else None
    except OSError:
        return  # the checkpoint checks name the directory that cannot be read
    if step:
        count = len(open_built(cfg.data.path, cfg, "data.path")) if cfg.data.path else None
        resume_checks.check_resume_data_settings(step, resume_checks.data_settings(cfg), sequences=count)


def _check_init_tokenizer(cfg: PretrainConfig) -> None:
    """The weights of checkpoint.init_from were trained on the ids of its tokenizer: data of another
    (the embedded synthetic data is byte-tokenized) trains a model whose every embedding means
    another token, silently where that tokenizer has fewer ids than the model's vocabulary."""
    from engine.checkpoint import CheckpointNotFound, resolve
    from polar.checkpoint_tokenizer import TokenizerMismatch, choose, find

    try:
        step = resolve(cfg.checkpoint.init_from)
    except CheckpointNotFound:
        return  # the checkpoint checks name a missing checkpoint
    data = open_built(cfg.data.path, cfg, "data.path").meta.get("tokenizer", "byte") if cfg.data.path else "byte"
    try:
        # as for a tokenizer a user names: one the checkpoint does not record, or that cannot be loaded
        # here, is taken at its word
        choose(str(data), step, "data")
    except TokenizerMismatch:
        own = find(step)
        what = f"data.path={cfg.data.path} is tokenized by {data}" if cfg.data.path else \
            "the embedded synthetic data is tokenized by the byte tokenizer"
        raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from} was trained with the tokenizer {own}, "
                          f"but {what}: its ids would mean other tokens to the model; build the data with that "
                          f"tokenizer (polar data build RECORDS -o DIR --tokenizer {own}) and set data.path=DIR") \
            from None


def eval_sets(cfg: PretrainConfig) -> list[tuple[str, str, str]]:
    """data.eval_path's sets as (name, path, the setting as messages name it: "data.eval_path" for a set given
    by its path alone, "data.eval_path's NAME" for one of several)."""
    sets = named_datasets("data.eval_path", cfg.data.eval_path)
    alone = len(sets) == 1 and sets[0][1] == cfg.data.eval_path.strip()
    return [(name, path, "data.eval_path" if alone else f"data.eval_path's {name}") for name, path in sets]


def built_data(cfg: PretrainConfig) -> RunData:
    train = open_built(cfg.data.path, cfg, "data.path")
    spec = train.meta.get("tokenizer")
    tokenizer = spec if isinstance(spec, str) and (Path(spec) / "tokenizer.json").is_file() else None
    evals = {}
    for name, path, setting in eval_sets(cfg):
        evals[name] = open_built(path, cfg, setting)
        _check_same_tokenizer(evals[name], train, f"{setting}={path}", f"data.path={cfg.data.path}")
    desc = (f"data: {cfg.data.path}: {train.num_groups:,} groups in {len(train):,} packed sequences of "
            f"{train.seq_length} tokens ({train.packing_efficiency:.1%} full)")
    if evals:
        desc += "; evaluated on " + ", ".join(f"{name} ({ds.num_groups:,} groups)" for name, ds in evals.items())
    return RunData(train, evals, train.meta["pad_id"], desc, tokenizer=tokenizer, source=cfg.data.path)


def synthetic_data(cfg: PretrainConfig) -> RunData:
    """The embedded default, built the same on every rank from the seed: no broadcast, no shared
    filesystem needed."""
    from engine.data import PackedGroups
    from engine.packing import Group
    from polar.pretrain_data import encode_triplets, make_splits
    from polar.tokenizer import ByteTokenizer

    t0 = time.time()
    tok = ByteTokenizer()
    splits = make_splits(cfg.synthetic)
    seq = cfg.data.seq_length

    def encode(triplets):
        encoded = encode_triplets(tok, triplets, cfg.synthetic.wrapper, max_length=seq, group_capacity=seq)
        return [Group(prefix=e.prefix, candidates=list(e.candidates), labels=lab) for e, lab in encoded]

    sets = {"training data": encode(splits.train), "held-out evaluation data": encode(splits.eval_held_out)}
    if cfg.synthetic.eval_seen:
        sets["seen-policy evaluation data"] = encode(splits.eval_seen)
    lengths = {name: np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
               for name, groups in sets.items()}
    over = {name: int((n > seq).sum()) for name, n in lengths.items() if (n > seq).any()}
    if over:
        # prompts are already cut to fit: what is left is the responses, which do not grow with
        # data.seq_length, so the longest group of all the sets is the length that fits them all
        longest = max(int(n.max()) for n in lengths.values())
        raise ConfigError("; ".join(f"{name}: {k} of {len(sets[name])} triplets" for name, k in over.items())
                          + f" do not fit data.seq_length={seq} as one group even with a shorter prompt (a group "
                          f"is never split); raise data.seq_length to at least {longest}")

    def pack(name):
        try:
            return PackedGroups(sets[name], seq, method=cfg.data.packing)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from e

    train = pack("training data")
    evals = {"held_out": pack("held-out evaluation data")}
    if cfg.synthetic.eval_seen:
        evals["seen"] = pack("seen-policy evaluation data")
    dup = sum(len(g.prefix) * (len(g.candidates) - 1) for g in train.groups)
    # said on the line: a full-size preset with data.path left empty trains on these toy policies
    desc = (f"data: synthetic data (data.path empty): {len(train.groups):,} training groups -> {len(train):,} "
            f"packed sequences of {seq} tokens ({train.packing_efficiency:.1%} full); shared prefixes save {dup:,} "
            f"tokens ({dup / (train.num_real_tokens + dup):.1%} of the duplicated layout); built in "
            f"{time.time() - t0:.1f}s")
    if cfg.model.vocab_size > tok.vocab_size:  # set by a preset (check() sets an unset one to the byte vocab)
        desc += (f"; note: model.vocab_size={cfg.model.vocab_size}, but the synthetic data is byte-tokenized "
                 f"({tok.vocab_size} ids): set data.path to a dataset built with the model's tokenizer (polar "
                 f"data build RECORDS -o DIR --tokenizer TOKENIZER) to train on real data")
    return RunData(train, evals, tok.pad_id, desc, splits)


def prepare_data(cfg: PretrainConfig) -> RunData:
    return built_data(cfg) if cfg.data.path else synthetic_data(cfg)


def summarize(data: RunData, results: dict) -> tuple[dict, list[str]]:
    """The recipe's part of summary.json and its closing log lines, from the evaluation results."""
    if data.splits is not None:
        from polar import baselines

        held, seen = data.splits.eval_held_out, results.get("seen")
        summary = {
            "held_out_pair_accuracy": results["held_out"]["pair_accuracy"],
            "train_pair_accuracy": seen["pair_accuracy"] if seen else None,
            "held_out_loss": results["held_out"]["loss"],
            "seen_loss": seen["loss"] if seen else None,
            "baselines": {name: baselines.pairwise_accuracy(fn, held)
                          for name, fn in (("word_overlap", baselines.word_overlap),
                                           ("bigram_overlap", baselines.bigram_overlap),
                                           ("length_difference", baselines.length_difference))},
            "held_out_pairs": results["held_out"]["pairs"],
        }
        seen_part = f" (seen policies {seen['pair_accuracy']:.3f})" if seen else ""
        line = (f"held-out pair accuracy {summary['held_out_pair_accuracy']:.3f}{seen_part} | "
                + " | ".join(f"{k} {v:.3f}" for k, v in summary["baselines"].items()))
        return summary, [line]
    if list(results) == [LONE_SET]:
        r = results[LONE_SET]
        summary = {"eval_pair_accuracy": r["pair_accuracy"], "eval_loss": r["loss"], "eval_pairs": r["pairs"]}
        return summary, [f"evaluation pair accuracy {r['pair_accuracy']:.3f}, loss {r['loss']:.4f}"]
    # named sets: each under summary.json's "evaluations" alone (a key made of a set's name could meet another)
    return {}, [f"evaluation of {name}: pair accuracy {r['pair_accuracy']:.3f}, loss {r['loss']:.4f} "
                f"({r['pairs']} pairs)" for name, r in results.items()]
