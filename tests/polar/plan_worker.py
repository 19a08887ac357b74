"""What `polar plan` estimates, measured on the engine's real model on CPU (run under torchrun, or alone).

    plan_worker.py counts --out F.json --layouts tp1,tp2,pp2,tp2pp2 [overrides]
        builds the model at each layout in turn (one torchrun world, megatron's groups rebuilt per layout)
        and writes, per layout, every rank's position and the parameters it holds
    plan_worker.py runs --out F.json --runs R.json
        R.json is a list of {"name", "mode", "overrides"}, run in turn in one world (start-up is most of a
        run's time; megatron's parallel state is torn down after each as tests/engine/dist_worker.py's
        next_layout does), written as {name: result}. "memory": a few training steps, every rank's
        resident-memory growth (see `measure_memory`); "checkpoint": a run to its end, which saves its last
        step in its run_dir (result None)

Run with MALLOC_MMAP_THRESHOLD_ fixed (the test sets it) so that glibc returns every large block to the
system when it is freed and resident memory follows the tensors that are alive.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

LAYOUTS = {  # name -> parallel.* overrides
    "tp1": [],
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
    "pp2vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "tp2pp2": ["parallel.tp=2", "parallel.pp=2"],
    "tp2pp2lm": ["parallel.tp=2", "parallel.pp=2", "train.aux_lm_weight=0.5"],  # with the auxiliary LM head
    "tp2pp2bias": ["parallel.tp=2", "parallel.pp=2", "model.add_qkv_bias=true"],  # q/k/v biases (Qwen2)
}


def _gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def counts(args) -> None:
    from megatron.core import parallel_state

    from engine.config import EngineConfig
    from engine.config_load import load_config
    from engine.parallelize import build_model, count_parameters
    from engine.runtime import init_runtime, shutdown_runtime, world_size_from_env

    result = {}
    for name in args.layouts.split(","):
        cfg = load_config(EngineConfig, None, args.overrides + LAYOUTS[name])
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        rt = init_runtime(cfg.parallel, cfg.train.seed)
        chunks, _ = build_model(cfg.model, cfg.parallel, cfg.train, rt)
        mine = {"rank": rt.rank, "tp_rank": rt.tp_rank, "pp_rank": rt.pp_rank, "dp_rank": rt.dp_rank,
                "params": count_parameters(chunks), "world": world_size_from_env()}
        result[name] = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ranks": _gather(mine)}
        del chunks
        gc.collect()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    # gloo groups left to the interpreter's exit sometimes abort it ("terminate called without an
    # active exception", exit -6 on one rank: seen in CI) after the counts were written
    shutdown_runtime()


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: resident peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Linux resets VmHWM to the current resident size on writing 5 to clear_refs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory(overrides: list, steps: int) -> list:
    """Resident memory of one rank: `before` after the runtime, the data and one throw-away step of a tiny
    model at the same layout (what the libraries set up on first use), before the model exists; `state`
    after one training step (weights, fp32 gradient buffer and Adam state all allocated) with the build's
    temporaries freed; `peak` the highest resident size during the next steps. Growth is measured from
    `before`. -> every rank's figures."""
    import torch

    from engine.config import EngineConfig
    from engine.config_load import load_config
    from engine.data import PackedGroups
    from engine.runtime import init_runtime, validate_layout, world_size_from_env
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    torch.set_num_threads(1)
    cfg = load_config(EngineConfig, None, overrides)
    validate_layout(cfg.model, cfg.parallel, cfg.train, world_size_from_env(), cfg.data.seq_length)
    rt = init_runtime(cfg.parallel, cfg.train.seed)
    # One step of a tiny model at the same layout first: the modules, communication buffers and caches the
    # libraries set up on first use are then part of the baseline, not of the model's growth.
    tp, stages = cfg.parallel.tp, cfg.parallel.pp * (cfg.parallel.vpp or 1)
    tiny = copy.deepcopy(cfg)
    tiny.model = dataclasses.replace(cfg.model, num_layers=stages, hidden_size=16 * tp, num_attention_heads=2 * tp,
                                     num_query_groups=tp, ffn_hidden_size=16 * tp, vocab_size=64 * tp)
    warm = Trainer(tiny, rt, PackedGroups(random_groups(3, 50, 64 * tp, cfg.data.seq_length, k_max=2),
                                          cfg.data.seq_length), cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    warm.train_step()
    del warm
    data = PackedGroups(random_groups(7, 200, cfg.model.vocab_size, cfg.data.seq_length, k_max=2),
                        cfg.data.seq_length)
    gc.collect()
    before = _status("VmRSS")
    trainer = Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    trainer.train_step()
    gc.collect()
    state = _status("VmRSS") - before
    _reset_peak()
    for _ in range(steps):
        trainer.train_step()
    peak = _status("VmHWM") - before
    mine = {"rank": rt.rank, "tp_rank": rt.tp_rank, "pp_rank": rt.pp_rank, "dp_rank": rt.dp_rank,
            "state_bytes": state, "peak_bytes": peak, "before_bytes": before,
            "tp": rt.tp, "pp": rt.pp, "dp": rt.dp}
    return _gather(mine)


def train_to_end(overrides: list) -> None:
    """A run of its train.steps from fresh weights: its end saves a checkpoint step in its run_dir."""
    from engine.config import EngineConfig
    from engine.config_load import load_config
    from engine.data import PackedGroups
    from engine.runtime import init_runtime, validate_layout, world_size_from_env
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    cfg = load_config(EngineConfig, None, overrides)
    validate_layout(cfg.model, cfg.parallel, cfg.train, world_size_from_env(), cfg.data.seq_length)
    rt = init_runtime(cfg.parallel, cfg.train.seed)
    data = PackedGroups(random_groups(7, 60, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
    Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None).fit()


def runs(args) -> None:
    from engine.runtime import shutdown_runtime
    from tests.engine.dist_worker import next_layout, parallel_state_globals

    with open(args.runs) as f:
        todo = json.load(f)
    results, fresh = {}, parallel_state_globals()
    for i, run in enumerate(todo):
        if i:
            next_layout(fresh)
        if run["mode"] == "memory":
            results[run["name"]] = measure_memory(run["overrides"], args.steps)
        else:
            results[run["name"]] = train_to_end(run["overrides"])
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    shutdown_runtime()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("counts", "runs"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", default="tp1")
    ap.add_argument("--runs", default="")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    if args.mode == "counts":
        counts(args)
    else:
        runs(args)


if __name__ == "__main__":
    main()
