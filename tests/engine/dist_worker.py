"""Runs a few training steps of a tiny reward model at one parallel layout; writes losses as JSON.

Used by the parity tests under `torchrun` and as a single process. The data is random token
groups (K candidates over a shared prefix) from a fixed seed, so every layout sees the same
global batches; initial weights come from a checkpoint (`--init`) so every layout starts equal.

Several runs share a process (or a torchrun launch) through tests/engine/runs_worker.py, which
calls main once per run and, between runs, next_layout.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

from engine.config import EngineConfig  # noqa: E402
from engine.config_load import load_config  # noqa: E402


DDP_FLAGS = ("overlap_grad_reduce", "overlap_param_gather", "use_distributed_optimizer")


def random_groups(seed: int, n: int, vocab: int, seq_length: int, k_max: int = 3):
    from engine.packing import Group

    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n):
        k = int(rng.integers(2, k_max + 1))
        prefix = rng.integers(1, vocab, size=int(rng.integers(1, 20)), dtype=np.int32)
        cands = [rng.integers(1, vocab, size=int(rng.integers(1, 12)), dtype=np.int32) for _ in range(k)]
        labels = np.zeros(k, dtype=np.int8)
        labels[int(rng.integers(0, k))] = 1
        groups.append(Group(prefix=prefix, candidates=cands, labels=labels))
    return groups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", default="", help="checkpoint with the initial weights")
    ap.add_argument("--save-init", default="", help="write the freshly initialised weights here first")
    ap.add_argument("--no-eval", action="store_true", help="train only (for tests that compare no evaluation)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from engine.runtime import shutdown_runtime

    rt, result = train(args)
    if rt.is_main:
        with open(args.out, "w") as f:
            json.dump(result, f)
    shutdown_runtime()


def train(args):
    """One run at the layout its settings give: (runtime, result)."""
    defaults = [
        "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.vocab_size=64",
        "train.steps=3", "train.global_batch=4", "train.micro_batch=1", "train.lr=3e-3",
        "train.warmup_steps=1", "data.seq_length=64", "log.interval=1", "log.tensorboard=false",
        "checkpoint.resume=false", "train.aux_lm_weight=0.5",
    ]
    cfg = load_config(EngineConfig, None, defaults + args.overrides)
    if args.init:
        cfg.checkpoint.init_from = args.init

    from engine import checkpoint
    from engine.data import PackedGroups
    from engine.runtime import init_runtime, validate_layout, world_size_from_env
    from engine.trainer import Trainer

    validate_layout(cfg.model, cfg.parallel, cfg.train, world_size_from_env(), cfg.data.seq_length)
    rt = init_runtime(cfg.parallel, cfg.train.seed)
    data = PackedGroups(random_groups(7, 60, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
    trainer = Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    if args.save_init:
        # the run trains on from the weights it saved, as a run from them does (saves a process per reference)
        checkpoint.save(args.save_init, 0, trainer.model, None, {"step": 0})
    history = trainer.fit()
    evaluation = None if args.no_eval else trainer.evaluate(data)
    start = history[0]["step"] if history else None
    # what megatron's DDP was handed: a parallel.overlap_* setting dropped on the way trains the same
    ddp = {k: getattr(trainer.model[0].ddp_config, k) for k in DDP_FLAGS}
    return rt, {"history": history, "eval": evaluation, "start_step": start, "ddp": ddp}


def parallel_state_globals() -> dict:
    """megatron's parallel state: the module's globals (groups, ranks, sizes, buffers) by name."""
    from megatron.core import parallel_state

    return {k: copy.copy(v) if isinstance(v, (list, dict, set)) else v for k, v in vars(parallel_state).items()
            if k.startswith("_") and not k.startswith("__") and not callable(v) and not isinstance(v, type(copy))}


def next_layout(fresh: dict) -> None:
    """Tears down the layout that ran (the default process group stays) and puts megatron's parallel
    state back to what the first layout started from: the next one builds all of it again itself,
    as in a process of its own, and finds nothing of the last one's groups, ranks or buffers to fall
    back on. destroy_model_parallel (megatron-core 0.19) leaves the rank lists and the intra-partial
    DP groups behind, and initialize_model_parallel sets some of them (_EMBEDDING_GLOBAL_RANKS,
    which is_rank_in_embedding_group reads) only on the ranks of such a group: a rank outside the
    next layout's would keep the last layout's list."""
    import gc

    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():  # as shutdown_runtime: no rank tears down groups another rank still uses
        dist.barrier()
    parallel_state.destroy_model_parallel()
    gc.collect()  # the last run's model, optimizer and gradient buffers
    for name in set(parallel_state_globals()) - set(fresh):
        delattr(parallel_state, name)
    for name, value in fresh.items():
        setattr(parallel_state, name, copy.copy(value))


if __name__ == "__main__":
    main()
