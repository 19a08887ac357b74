"""Writes a small real reward model as an engine checkpoint: `python -m tests.polar.serve.make_checkpoint RUN_DIR`.

The model is built and saved by the engine itself (engine.parallelize.build_model, engine.checkpoint.save)
in RUN_DIR/checkpoints/step_00000000, with the run's config.yaml beside it, as engine/pretrain.py
leaves a run. The value head, zero at initialisation (POLAR's rule for a new head), gets random
weights so that rewards differ between inputs and parity tests compare something. A last argument
N > 0 gives the model dynamic RoPE scaling within N positions (InternLM2's, as POLAR-7B has).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch


def main(run_dir: str, num_layers: int = 2, hidden: int = 64, heads: int = 4, groups: int = 2, ffn: int = 176,
         vocab: int = 260, dynamic_positions: int = 0) -> None:
    warnings.filterwarnings("ignore")
    from engine.config import EngineConfig
    from engine.config_load import dump_yaml
    from engine import checkpoint
    from engine.parallelize import build_model
    from engine.runtime import init_runtime, shutdown_runtime

    cfg = EngineConfig()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = num_layers, hidden, heads
    cfg.model.num_query_groups, cfg.model.ffn_hidden_size, cfg.model.vocab_size = groups, ffn, vocab
    if dynamic_positions:
        cfg.model.rope_scaling, cfg.model.rope_scaling_factor = "dynamic", 2.0
        cfg.model.max_position_embeddings = dynamic_positions
    cfg.train.global_batch = 1
    cfg.parallel.distributed_optimizer = False
    cfg.run_dir = run_dir
    rt = init_runtime(cfg.parallel, seed=7)
    chunks, _ = build_model(cfg.model, cfg.parallel, cfg.train, rt)
    head = chunks[0].module.value_head.weight
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(11)) * 0.2)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "config.yaml").write_text(dump_yaml(cfg))
    checkpoint.save(str(Path(run_dir) / "checkpoints"), 0, chunks, None, {"step": 0})
    shutdown_runtime()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], *[int(a) for a in args[1:]])
