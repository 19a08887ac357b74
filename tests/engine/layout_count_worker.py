"""Builds the trainer of a tiny reward model at one parallel layout (one process or under torchrun)
and writes what it reports of the model as JSON: the parameter count that the log line and
summary.json give."""
from __future__ import annotations

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")


def main():
    from engine.config import EngineConfig, load_config
    from engine.data import PackedGroups
    from engine.runtime import init_runtime, shutdown_runtime
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    out, run_dir, *overrides = sys.argv[1:]
    cfg = load_config(EngineConfig, None, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=2",
        "model.ffn_hidden_size=64", "model.vocab_size=64", "train.global_batch=4", "train.micro_batch=1",
        "data.seq_length=64", "log.tensorboard=false", "checkpoint.resume=false", f"run_dir={run_dir}", *overrides])
    rt = init_runtime(cfg.parallel, cfg.train.seed)
    data = PackedGroups(random_groups(7, 20, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
    trainer = Trainer(cfg, rt, data, run_dir, pad_id=0, log=lambda *a, **k: None)
    if rt.is_main:
        with open(out, "w") as f:
            json.dump({"parameters": trainer.num_parameters}, f)
    shutdown_runtime()


if __name__ == "__main__":
    main()
