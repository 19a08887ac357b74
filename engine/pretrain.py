"""POLAR pre-training entry point.

    torchrun --nproc_per_node 2 engine/pretrain.py                      # the embedded CPU default
    torchrun --nproc_per_node 8 engine/pretrain.py --config configs/polar_1_8b.yaml parallel.tp=2

With no arguments it builds its own data (synthetic policies, byte-level tokenizer), trains a
tiny reward model, evaluates pairwise accuracy on held-out and seen policies next to non-learned
baselines, and writes `summary.json` and a checkpoint into the run directory. This script is the
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


def run(cfg: PretrainConfig) -> int:
    warnings.filterwarnings("ignore", module="megatron")
    from engine.data import PackedGroups
    from engine.runtime import init_runtime, shutdown_runtime, validate_layout, world_size_from_env
    from polar import baselines
    from polar.pretrain_data import encode_triplets, make_splits
    from polar.tokenizer import ByteTokenizer

    t_start = time.time()
    tok = ByteTokenizer()
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    validate_layout(cfg.model, cfg.parallel, cfg.train, world_size_from_env())
    if cfg.synthetic.wrapper not in ("sft", "pretrain"):
        raise ConfigError(f"synthetic.wrapper={cfg.synthetic.wrapper!r}: expected sft or pretrain")

    rt = init_runtime(cfg.parallel, cfg.train.seed)
    say = print if rt.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run_dir)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    say(f"run directory: {run_dir.resolve()}")

    # Every rank builds the same data from the seed: no broadcast, no shared filesystem needed.
    t0 = time.time()
    splits = make_splits(cfg.synthetic)
    seq = cfg.data.seq_length

    def pack(triplets, name):
        groups = to_groups(encode_triplets(tok, triplets, cfg.synthetic.wrapper, max_length=seq))
        try:
            return PackedGroups(groups, seq, method=cfg.data.packing)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from e

    train = pack(splits.train, "training data")
    held_out = pack(splits.eval_held_out, "held-out evaluation data")
    seen = pack(splits.eval_seen, "seen-policy evaluation data")
    dup = sum(len(g.prefix) * (len(g.candidates) - 1) for g in train.groups)
    say(
        f"data: {len(train.groups):,} training groups -> {len(train):,} packed sequences of {seq} tokens "
        f"({train.packing_efficiency:.1%} full); shared prefixes save {dup:,} tokens "
        f"({dup / (train.num_real_tokens + dup):.1%} of the duplicated layout); built in {time.time() - t0:.1f}s"
    )

    from engine.trainer import Trainer

    trainer = Trainer(cfg, rt, train, str(run_dir), pad_id=tok.pad_id, log=say)
    t_train = time.time()
    start_step = trainer.step
    history = trainer.fit()
    train_time = time.time() - t_train

    say("evaluating ...")
    ev_held = trainer.evaluate(held_out)
    ev_seen = trainer.evaluate(seen)
    if rt.is_main:
        base = {
            "word_overlap": baselines.pairwise_accuracy(baselines.word_overlap, splits.eval_held_out),
            "bigram_overlap": baselines.pairwise_accuracy(baselines.bigram_overlap, splits.eval_held_out),
            "length_difference": baselines.pairwise_accuracy(baselines.length_difference, splits.eval_held_out),
        }
        steps_run = trainer.step - start_step
        tokens = steps_run and sum(
            int(train.seq_tokens[train_idx].sum())
            for train_idx in (trainer.loader.global_batch_indices(b) for b in range(start_step, trainer.step))
        )
        summary = {
            "held_out_pair_accuracy": ev_held["pair_accuracy"],
            "train_pair_accuracy": ev_seen["pair_accuracy"],
            "held_out_loss": ev_held["loss"],
            "seen_loss": ev_seen["loss"],
            "baselines": base,
            "final_loss": history[-1]["loss"] if history else None,
            "steps": trainer.step,
            "tokens": tokens,
            "tokens_per_second": tokens / train_time if train_time > 0 else None,
            "train_seconds": train_time,
            "wall_seconds": time.time() - t_start,
            "parameters": trainer.num_parameters,
            "layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "vpp": rt.vpp},
            "packing_efficiency": train.packing_efficiency,
            "held_out_pairs": ev_held["pairs"],
            "history": history,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        say(
            f"held-out pair accuracy {ev_held['pair_accuracy']:.3f} (seen policies {ev_seen['pair_accuracy']:.3f}) | "
            + " | ".join(f"{k} {v:.3f}" for k, v in base.items())
        )
        say(f"wrote {run_dir / 'summary.json'}")
    shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
