"""Builds the trainer of a tiny reward model at parallel layouts in turn (under torchrun) and writes what it
reports of the model as JSON: the parameter count that the log line and summary.json give.

    layout_count_worker.py OUT RUN_DIR LAYOUTS.json
        LAYOUTS.json is {name: [overrides]}; writes {name: parameters}, each built in RUN_DIR/<name> with
        megatron's parallel state torn down in between as tests/engine/dist_worker.py's next_layout does
        (start-up is most of a launch's time)
"""
from __future__ import annotations

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

SETTINGS = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "model.vocab_size=64", "train.global_batch=4", "train.micro_batch=1",
    "data.seq_length=64", "log.tensorboard=false", "checkpoint.resume=false"]


def trainer(run_dir: str, overrides: list, rt=None):
    """The trainer of SETTINGS with `overrides` in run_dir, on `rt` (a new runtime at its layout if None)."""
    from engine.config import EngineConfig
    from engine.config_load import load_config
    from engine.data import PackedGroups
    from engine.runtime import init_runtime
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    cfg = load_config(EngineConfig, None, [*SETTINGS, f"run_dir={run_dir}", *overrides])
    rt = rt or init_runtime(cfg.parallel, cfg.train.seed)
    data = PackedGroups(random_groups(7, 20, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
    return Trainer(cfg, rt, data, run_dir, pad_id=0, log=lambda *a, **k: None)


def main():
    from engine.runtime import shutdown_runtime
    from tests.engine.dist_worker import next_layout, parallel_state_globals

    out, run_dir, layouts = sys.argv[1:]
    with open(layouts) as f:
        layouts = json.load(f)
    counts, fresh = {}, parallel_state_globals()
    for i, (name, overrides) in enumerate(layouts.items()):
        if i:
            next_layout(fresh)
        counts[name] = trainer(os.path.join(run_dir, name), overrides).num_parameters
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(counts, f)
    shutdown_runtime()


if __name__ == "__main__":
    main()
