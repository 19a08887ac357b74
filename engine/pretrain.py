"""POLAR pre-training entry point.

    torchrun --nproc_per_node 2 engine/pretrain.py                      # the embedded CPU default
    torchrun --nproc_per_node 8 engine/pretrain.py --config configs/polar_1_8b.yaml parallel.tp=2
    torchrun --nproc_per_node 8 engine/pretrain.py data.path=ds/ data.eval_path=ds_eval/ data.seq_length=16384

With no arguments it builds its own data (synthetic policies, byte-level tokenizer), trains a
tiny reward model, evaluates pairwise accuracy on held-out and seen policies next to non-learned
baselines, and writes `summary.json` and a checkpoint into the run directory. With data.path it
trains on a dataset built by `polar data build` instead (vocabulary size and pad id from its
metadata) and evaluates on data.eval_path if given. This script is the
only place where the engine (model, parallelism, loop) meets POLAR's text format (polar/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import ConfigError, EngineConfig, dump_yaml, load_config  # noqa: E402
from polar.pretrain_data import SyntheticDataConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"


@dataclass
class PretrainConfig(EngineConfig):
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="POLAR reward-model pre-training (run under torchrun).",
        epilog="Overrides: section.key=value, e.g. train.lr=1e-4 parallel.tp=2 model.num_layers=8",
    )
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/tiny_cpu.yaml)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", help="section.key=value settings")
    return ap.parse_args(argv)


def to_groups(encoded):
    from engine.packing import Group

    return [Group(prefix=e.prefix, candidates=list(e.candidates), labels=lab) for e, lab in encoded]


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        if args.print_config:
            if rank == 0:
                print(dump_yaml(cfg))
            return 0
        return run(cfg)
    except ConfigError as e:
        if rank == 0:
            print(f"config error: {e}", file=sys.stderr)
        return 2


def _set_vocab(cfg: PretrainConfig, vocab_size: int, source: str) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {source}'s {vocab_size}")


def open_built(path: str, cfg: PretrainConfig, setting: str):
    """A dataset written by `polar data build`, checked against the run's settings."""
    from engine.indexed_dataset import DatasetFormatError, IndexedDataset

    try:
        ds = IndexedDataset(path)
    except (DatasetFormatError, OSError) as e:
        raise ConfigError(f"{setting}={path}: {e}") from e
    if ds.seq_length != cfg.data.seq_length:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length}, but {setting}={path} is packed at "
                          f"{ds.seq_length}: set data.seq_length={ds.seq_length} (or rebuild the data)")
    for key in ("vocab_size", "pad_id"):
        if not isinstance(ds.meta.get(key), int):
            raise ConfigError(f"{setting}={path}: its metadata has no integer {key!r}; rebuild it with polar data build")
    return ds


def built_data(cfg: PretrainConfig):
    """(train, {name: eval data}, pad id) from data.path / data.eval_path."""
    train = open_built(cfg.data.path, cfg, "data.path")
    evals = {}
    if cfg.data.eval_path:
        evals["eval"] = open_built(cfg.data.eval_path, cfg, "data.eval_path")
        for key in ("vocab_size", "pad_id"):
            if evals["eval"].meta[key] != train.meta[key]:
                raise ConfigError(f"data.eval_path and data.path disagree on {key}: "
                                  f"{evals['eval'].meta[key]} vs {train.meta[key]} (different tokenizers?)")
    _set_vocab(cfg, train.meta["vocab_size"], "dataset tokenizer")
    return train, evals, train.meta["pad_id"]


def synthetic_data(cfg: PretrainConfig, tok):
    """The embedded default: (train, {"held_out": ..., "seen": ...}, splits), built the same on every rank."""
    from engine.data import PackedGroups
    from polar.pretrain_data import encode_triplets, make_splits

    splits = make_splits(cfg.synthetic)
    seq = cfg.data.seq_length

    def pack(triplets, name):
        groups = to_groups(encode_triplets(tok, triplets, cfg.synthetic.wrapper, max_length=seq))
        try:
            return PackedGroups(groups, seq, method=cfg.data.packing)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from e

    train = pack(splits.train, "training data")
    evals = {"held_out": pack(splits.eval_held_out, "held-out evaluation data"),
             "seen": pack(splits.eval_seen, "seen-policy evaluation data")}
    return train, evals, splits


def run(cfg: PretrainConfig) -> int:
    warnings.filterwarnings("ignore", module="megatron")
    from engine.runtime import init_runtime, shutdown_runtime, validate_layout, world_size_from_env
    from polar import baselines
    from polar.tokenizer import ByteTokenizer

    t_start = time.time()
    if cfg.data.path:
        train, evals, pad_id = built_data(cfg)
        splits = None
    else:
        if cfg.data.eval_path:
            raise ConfigError("data.eval_path needs data.path (the embedded default evaluates on its own data)")
        if cfg.synthetic.wrapper not in ("sft", "pretrain"):
            raise ConfigError(f"synthetic.wrapper={cfg.synthetic.wrapper!r}: expected sft or pretrain")
        tok = ByteTokenizer()
        _set_vocab(cfg, tok.vocab_size, "tokenizer")
        pad_id = tok.pad_id
    validate_layout(cfg.model, cfg.parallel, cfg.train, world_size_from_env(), cfg.data.seq_length)

    rt = init_runtime(cfg.parallel, cfg.train.seed)
    say = print if rt.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run_dir)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    say(f"run directory: {run_dir.resolve()}")

    t0 = time.time()
    if cfg.data.path:
        say(f"data: {cfg.data.path}: {train.num_groups:,} groups in {len(train):,} packed sequences of "
            f"{train.seq_length} tokens ({train.packing_efficiency:.1%} full)")
    else:
        # Every rank builds the same data from the seed: no broadcast, no shared filesystem needed.
        train, evals, splits = synthetic_data(cfg, tok)
        dup = sum(len(g.prefix) * (len(g.candidates) - 1) for g in train.groups)
        say(
            f"data: {len(train.groups):,} training groups -> {len(train):,} packed sequences of "
            f"{cfg.data.seq_length} tokens ({train.packing_efficiency:.1%} full); shared prefixes save {dup:,} "
            f"tokens ({dup / (train.num_real_tokens + dup):.1%} of the duplicated layout); built in "
            f"{time.time() - t0:.1f}s"
        )

    from engine.trainer import Trainer

    trainer = Trainer(cfg, rt, train, str(run_dir), pad_id=pad_id, log=say)
    t_train = time.time()
    start_step = trainer.step
    history = trainer.fit()
    train_time = time.time() - t_train

    if evals:
        say("evaluating ...")
    results = {name: trainer.evaluate(data) for name, data in evals.items()}
    if rt.is_main:
        steps_run = trainer.step - start_step
        seq_tokens = train.per_sequence["tokens"]
        tokens = steps_run and sum(
            int(seq_tokens[trainer.loader.global_batch_indices(b)].sum()) for b in range(start_step, trainer.step)
        )
        summary = {}
        if splits is not None:
            summary = {
                "held_out_pair_accuracy": results["held_out"]["pair_accuracy"],
                "train_pair_accuracy": results["seen"]["pair_accuracy"],
                "held_out_loss": results["held_out"]["loss"],
                "seen_loss": results["seen"]["loss"],
                "baselines": {
                    name: baselines.pairwise_accuracy(fn, splits.eval_held_out)
                    for name, fn in (("word_overlap", baselines.word_overlap),
                                     ("bigram_overlap", baselines.bigram_overlap),
                                     ("length_difference", baselines.length_difference))
                },
                "held_out_pairs": results["held_out"]["pairs"],
            }
        elif "eval" in results:
            summary = {"eval_pair_accuracy": results["eval"]["pair_accuracy"], "eval_loss": results["eval"]["loss"],
                       "eval_pairs": results["eval"]["pairs"]}
        summary.update({
            "final_loss": history[-1]["loss"] if history else None,
            "steps": trainer.step,
            "tokens": tokens,
            "tokens_per_second": tokens / train_time if train_time > 0 else None,
            "train_seconds": train_time,
            "wall_seconds": time.time() - t_start,
            "parameters": trainer.num_parameters,
            "layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "vpp": rt.vpp},
            "packing_efficiency": train.packing_efficiency,
            "data": cfg.data.path or "synthetic",
            "history": history,
        })
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if splits is not None:
            say(f"held-out pair accuracy {summary['held_out_pair_accuracy']:.3f} (seen policies "
                f"{summary['train_pair_accuracy']:.3f}) | "
                + " | ".join(f"{k} {v:.3f}" for k, v in summary["baselines"].items()))
        elif "eval" in results:
            say(f"evaluation pair accuracy {summary['eval_pair_accuracy']:.3f}, loss {summary['eval_loss']:.4f}")
        say(f"wrote {run_dir / 'summary.json'}")
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
