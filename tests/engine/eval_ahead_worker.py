"""engine.evaluation.evaluate with and without its read-ahead, for tests/engine/test_evaluation_read_ahead.py:
`evaluations` on a runtime the caller set up (the one-process layout, on the test session's runtime), or
main(), a rank under torchrun over gloo.

A tiny untrained model (its value head random) evaluates random groups (tests/engine/dist_worker.py's)
whole with the read-ahead and without it, and packed at twice training's length, then stops before its
3rd batch (a stop check answering SIGTERM), then meets an error reading the 3rd batch's sequences, then
one in the stop check itself.
Each rank writes RESULT.rankN: the statistics, the threads that read each evaluation's sequences and
their current CUDA devices, whether its batches reached the schedule page-locked, the stop's `done`
and `total`, each error and the read-ahead threads still alive after each way out.
engine.evaluation.EVAL_CHUNK is lowered to 2 (for the evaluations only) so that the small set takes
several batches.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")


class Recorded:
    """An evaluation set that records which thread reads each sequence, and raises on the
    `fail_at`th read (counted from 1; 0: never)."""

    def __init__(self, data, fail_at: int = 0):
        self.data, self.seq_length, self.fail_at = data, data.seq_length, fail_at
        self.threads: list[str] = []
        self.devices: set = set()

    def __len__(self) -> int:
        return len(self.data)

    def sequences(self, indices):
        import torch

        self.threads.append(threading.current_thread().name)
        if torch.cuda.is_available():  # the reading thread's current device: the rank's, not GPU 0
            self.devices.add(torch.cuda.current_device())
        if len(self.threads) == self.fail_at:
            raise ValueError(f"held_out.bin: sequence {int(indices[0])} is torn")
        return self.data.sequences(indices)


def _read_ahead_threads() -> list:
    return [t.name for t in threading.enumerate() if t.name.startswith("eval-read-ahead")]


def config(overrides: list):
    from engine.config import EngineConfig
    from engine.config_load import load_config
    from engine.runtime import validate_layout, world_size_from_env

    cfg = load_config(EngineConfig, None, [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=64", "train.global_batch=4", "train.micro_batch=1",
        "data.seq_length=64", "log.tensorboard=false", "checkpoint.resume=false", "train.aux_lm_weight=0.5",
        *overrides])
    validate_layout(cfg.model, cfg.parallel, cfg.train, world_size_from_env(), cfg.data.seq_length)
    return cfg


def evaluations(cfg, rt) -> dict:
    """This rank's results (the module docstring's), on `rt`; the model's weights are drawn from
    cfg.train.seed as in a process of its own."""
    from engine import evaluation

    chunk = evaluation.EVAL_CHUNK
    evaluation.EVAL_CHUNK = 2
    try:
        return _evaluations(cfg, rt)
    finally:
        evaluation.EVAL_CHUNK = chunk


def _evaluations(cfg, rt) -> dict:
    from engine import evaluation
    from engine.data import PackedGroups
    from engine.runtime import seed_model_parallel
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    data = PackedGroups(random_groups(7, 90, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
    seed_model_parallel(rt.device, cfg.train.seed, rt.groups.tp.rank())
    trainer = Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    import torch

    with torch.no_grad():  # the value head starts at zero (POLAR's rule): every reward 0 would compare nothing
        for chunk in trainer.model:
            for name, p in chunk.named_parameters():
                if "value_head" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(11)) * 0.2)
    out = {"sequences": len(data), "dp": rt.dp, "pp": rt.pp, "device": str(rt.device)}
    run_schedule, pinned = trainer._run_schedule, []

    def schedule(microbatches, *a, **k):  # whether each batch reached the schedule in page-locked memory
        pinned.extend(b.tokens.is_pinned() for b in microbatches)
        return run_schedule(microbatches, *a, **k)

    trainer._run_schedule = schedule
    for name, ahead in (("ahead", True), ("in_line", False)):
        source = Recorded(data)
        pinned.clear()
        out[name] = evaluation.evaluate(trainer, source, read_ahead=ahead)
        out[f"{name}_threads"] = sorted(set(source.threads))
        out[f"{name}_left"] = _read_ahead_threads()
        out[f"{name}_pinned"] = sorted(set(pinned))
        out[f"{name}_devices"] = sorted(source.devices)
    # the same groups packed at twice the length: an evaluation set is packed at a length of its own, by
    # which the pipeline stages size the activations they exchange
    repacked = PackedGroups(random_groups(7, 90, cfg.model.vocab_size, cfg.data.seq_length), 2 * cfg.data.seq_length)
    out["repacked"], out["repacked_sequences"] = evaluation.evaluate(trainer, repacked), len(repacked)

    asked = []

    def stop_before_third() -> str:
        asked.append(None)
        return "SIGTERM" if len(asked) == 3 else ""

    try:
        evaluation.evaluate(trainer, Recorded(data), stop_before_third)
    except evaluation.EvaluationStopped as stop:
        out["stopped"] = [stop.request, stop.done, stop.total]
    out["stopped_left"] = _read_ahead_threads()

    chunk = 2 * rt.pp  # sequences a batch: the 3rd batch's first read fails, on every rank alike
    for name, source, check in (("read_error", Recorded(data, fail_at=2 * chunk + 1), None),
                                ("check_error", Recorded(data), lambda: 1 / 0)):
        try:
            evaluation.evaluate(trainer, source, check)
        except Exception as e:  # noqa: BLE001 - the test compares what came out
            out[name] = f"{type(e).__name__}: {e}"
        out[f"{name}_left"] = _read_ahead_threads()
        out[f"{name}_training"] = all(chunk.training for chunk in trainer.model)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--result", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = config(args.overrides)
    from engine.runtime import init_runtime, shutdown_runtime

    rt = init_runtime(cfg.parallel, cfg.train.seed)
    out = evaluations(cfg, rt)
    with open(f"{args.result}.rank{rt.rank}", "w") as f:
        json.dump(out, f)
    shutdown_runtime()


if __name__ == "__main__":
    main()
