"""A few FP8 training steps of the tiny reward model through the engine's Trainer, counting how often
the weights are quantized; writes the losses, gradient norms and counts per optimizer step as JSON.

--cache step: each step's forward-backward schedule runs inside fp8_linear.weight_cache(), the scope
the trainer is meant to open (engine/model/fp8_linear.py). --cache fit: one scope around the whole
run, across optimizer steps: a deliberately wrong use, which trains on stale FP8 weights because the
distributed optimizer updates the weights without changing their version counters. --cache off:
weight_cache() made a no-op, so nothing caches whether or not the trainer opens the scope itself.
--cache trainer: the Trainer as it is. Runs as one process or under torchrun.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=2",
        "model.ffn_hidden_size=64", "model.vocab_size=64", "train.steps=3", "train.global_batch=4",
        "train.micro_batch=1", "train.lr=1e-2", "train.warmup_steps=0", "data.seq_length=64", "log.interval=1",
        "log.tensorboard=false", "checkpoint.resume=false", "checkpoint.save_at_end=false"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", choices=("off", "step", "fit", "trainer"), required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    from engine.config import EngineConfig, load_config
    from engine.data import PackedGroups
    from engine.model import fp8_linear as fl
    from engine.runtime import init_runtime, shutdown_runtime
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    cfg = load_config(EngineConfig, None, TINY + args.overrides)
    counts = {"weights": 0}
    quantize = fl.quantize

    def counting(t, *a, **k):
        counts["weights"] += isinstance(t, torch.nn.Parameter)
        return quantize(t, *a, **k)

    fl.quantize = counting
    if args.cache == "off":  # the scope the trainer opens around each step's schedule too
        import engine.trainer

        fl.weight_cache = engine.trainer.weight_cache = contextlib.nullcontext
    scope = fl.weight_cache
    per_step = []
    run_schedule, optimizer_step = Trainer._run_schedule, Trainer._optimizer_step

    def scoped(self, *a, **k):
        with scope() if args.cache == "step" else contextlib.nullcontext():
            return run_schedule(self, *a, **k)

    def counted(self):
        per_step.append(counts["weights"] - sum(per_step))
        return optimizer_step(self)

    Trainer._run_schedule, Trainer._optimizer_step = scoped, counted
    rt = init_runtime(cfg.parallel, cfg.train.seed)
    data = PackedGroups(random_groups(7, 60, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
    trainer = Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    linears = sum(isinstance(m, (fl.Fp8ColumnParallelLinear, fl.Fp8RowParallelLinear))
                  for chunk in trainer.model for m in chunk.modules())
    with scope() if args.cache == "fit" else contextlib.nullcontext():
        history = trainer.fit()
    if rt.is_main:
        with open(args.out, "w") as f:
            json.dump({"history": history, "per_step": per_step, "linears": linears,
                       "micro_batches": cfg.train.global_batch // cfg.train.micro_batch}, f)
    shutdown_runtime()


if __name__ == "__main__":
    main()
