"""Several short FP8 trainings of the tiny reward model through the engine's Trainer in ONE process
(one interpreter, torch and megatron start-up for all of them: most of a run's time here), counting
how often the weights are quantized; writes each run's losses, gradient norms and counts per
optimizer step as JSON, by run name.

Each --training NAME:CACHE:RECIPE builds its model afresh from the same seed (engine.runtime
.seed_model_parallel: the same weights as a run in a process of its own) and trains 3 steps of 4
micro-batches with train.fp8=RECIPE. CACHE:
  step     each step's forward-backward schedule inside fp8_linear.weight_cache(), the scope the
           trainer is meant to open (engine/model/fp8_linear.py);
  fit      one scope around the whole run, across optimizer steps: a deliberately wrong use, which
           trains on stale FP8 weights because the distributed optimizer updates the weights without
           changing their version counters;
  off      weight_cache() a no-op for this run, so nothing caches whether or not the trainer opens
           the scope itself;
  trainer  the Trainer as it is.
Runs as one process or under torchrun (every run at the layout the trailing settings give).
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
CACHES = ("off", "step", "fit", "trainer")


def parse_run(text: str) -> tuple[str, str, str]:
    name, cache, recipe = text.split(":")
    if cache not in CACHES:
        raise SystemExit(f"--training {text}: cache {cache!r} is none of {CACHES}")
    return name, cache, recipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dir", required=True, help="each run's run_dir is DIR/NAME")
    ap.add_argument("--training", type=parse_run, action="append", required=True, help="NAME:CACHE:RECIPE")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    import engine.trainer
    from engine.config import EngineConfig
    from engine.config_load import load_config
    from engine.data import PackedGroups
    from engine.model import fp8_linear as fl
    from engine.runtime import init_runtime, seed_model_parallel, shutdown_runtime
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    counts = {"weights": 0}
    quantize, real_cache = fl.quantize, fl.weight_cache

    def counting(t, *a, **k):
        counts["weights"] += isinstance(t, torch.nn.Parameter)
        return quantize(t, *a, **k)

    fl.quantize = counting
    now = {}  # the run in progress: its cache mode, scope and per-step counts
    run_schedule, optimizer_step = Trainer._run_schedule, Trainer._optimizer_step

    def scoped(self, *a, **k):
        with now["scope"]() if now["cache"] == "step" else contextlib.nullcontext():
            return run_schedule(self, *a, **k)

    def counted(self):
        now["per_step"].append(counts["weights"] - now["before"] - sum(now["per_step"]))
        return optimizer_step(self)

    Trainer._run_schedule, Trainer._optimizer_step = scoped, counted
    rt, results = None, {}
    for name, cache, recipe in args.training:
        cfg = load_config(EngineConfig, None, TINY + [f"run_dir={os.path.join(args.dir, name)}",
                                                      f"train.fp8={recipe}", *args.overrides])
        rt = rt or init_runtime(cfg.parallel, cfg.train.seed)
        if rt.is_main:  # which run a failure's output belongs to
            print(f"fp8 cache run {name}: cache {cache}, train.fp8={recipe}", flush=True)
        seed_model_parallel(rt.device, cfg.train.seed, rt.tp_rank)
        # a scope the run before left open would cache this run's weights too
        assert fl._weight_cache is None and fl._cache_depth == 0, f"{name}: a weight cache scope is open"
        # the scope the trainer opens around each step's schedule too
        fl.weight_cache = engine.trainer.weight_cache = contextlib.nullcontext if cache == "off" else real_cache
        now.update(cache=cache, scope=fl.weight_cache, per_step=[], before=counts["weights"])
        data = PackedGroups(random_groups(7, 60, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
        trainer = Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
        linears = sum(isinstance(m, (fl.Fp8ColumnParallelLinear, fl.Fp8RowParallelLinear))
                      for chunk in trainer.model for m in chunk.modules())
        with now["scope"]() if cache == "fit" else contextlib.nullcontext():
            history = trainer.fit()
        fl.weight_cache = engine.trainer.weight_cache = real_cache
        results[name] = {"history": history, "per_step": now["per_step"], "linears": linears,
                         "micro_batches": cfg.train.global_batch // cfg.train.micro_batch}
    if rt.is_main:
        with open(args.out, "w") as f:
            json.dump(results, f)
    shutdown_runtime()


if __name__ == "__main__":
    main()
