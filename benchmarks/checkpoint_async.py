"""How long a checkpoint save stops training: checkpoint.async_save=false (the files written before
save() returns) against true (a copy in host memory, the files written by a forked process while
the next steps run), in one process on the CPU.

    python benchmarks/checkpoint_async.py [--hidden 512] [--layers 4] [--steps 4] [--repeats 3]
                                          [--optimizer-format fully_reshardable] [--dir DIR]

A trainer (the engine's, gloo, one rank) trains two steps, then saves and trains --steps more;
the background save is then waited for (the next save or the end of a run would). Rows per mode:
the ms save() blocked, the ms per step of the steps after it (against the same steps without a
save: what the writer takes from training on this machine's cores), the ms the end still waited,
and the training stopped in all (save + wait), with its ratio to the synchronous save's, medians of
--repeats. save() blocks in both modes while the state is gathered (fully_reshardable: each
parameter's optimizer state assembled whole, megatron's get_parameter_state_dp_zero) and, in the
background mode, copied and the writer forked; the writing is what moves off. The files are
fsynced to the directory given (default: a temporary one), whose device sets the write time; on
2 shared cores the writer process competes with training for the CPU.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402


def measure(args, rt, run_dir: str, background: bool) -> dict:
    """One save in the middle of a run: its blocked, per-step and waited ms."""
    from engine.config import EngineConfig
    from engine.config_load import load_config
    from engine.data import PackedGroups
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    cfg = load_config(EngineConfig, None, [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_attention_heads=8",
        "model.num_query_groups=4", f"model.ffn_hidden_size={4 * args.hidden}", "model.vocab_size=512",
        "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=1", f"train.steps={2 * args.steps + 2}",
        "data.seq_length=128", "log.tensorboard=false", f"run_dir={run_dir}", "checkpoint.resume=false",
        f"checkpoint.async_save={str(background).lower()}", f"checkpoint.optimizer_format={args.optimizer_format}"])
    data = PackedGroups(random_groups(3, 64, 512, 128), 128)
    trainer = Trainer(cfg, rt, data, run_dir, pad_id=0, log=lambda *a, **k: None)

    def steps(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            trainer.train_step()
            trainer.step += 1
        return (time.perf_counter() - t) / n * 1e3

    steps(2)
    plain = steps(args.steps)  # the same steps with no save around them
    t = time.perf_counter()
    trainer.save()
    blocked = (time.perf_counter() - t) * 1e3
    during = steps(args.steps)
    t = time.perf_counter()
    trainer.finish_saves()
    waited = (time.perf_counter() - t) * 1e3
    trainer.loader.close()
    return {"blocked": blocked, "plain": plain, "during": during, "waited": waited, "stopped": blocked + waited}


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--hidden", type=at_least(64), default=512, help="the model's hidden size (default %(default)s)")
    ap.add_argument("--layers", type=at_least(1), default=4, help="the model's layers (default %(default)s)")
    ap.add_argument("--steps", type=at_least(1), default=4, help="steps timed after the save")
    ap.add_argument("--repeats", type=at_least(1), default=3,
                    help="saves timed in each mode, the median shown (default %(default)s)")
    ap.add_argument("--optimizer-format", choices=("fully_reshardable", "dp_reshardable"), default="fully_reshardable",
                    help="checkpoint.optimizer_format of the saves (default %(default)s)")
    ap.add_argument("--dir", default="", help="where the checkpoints go (default: a temporary directory)")
    args = ap.parse_args()

    from engine.quiet import silence_known_warnings

    silence_known_warnings()  # before megatron is imported: some of its messages come at import
    from engine.config import ParallelConfig
    from engine.runtime import init_runtime, shutdown_runtime

    rt = init_runtime(ParallelConfig(), seed=1)
    rows = {False: [], True: []}
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        for r in range(args.repeats):
            for background in (False, True):  # alternated: both modes see the same machine load
                rows[background].append(measure(args, rt, os.path.join(tmp, f"{int(background)}_{r}"), background))
        step = next(Path(tmp, "0_0", "checkpoints").glob("step_*"))
        size = sum(f.stat().st_size for f in step.iterdir())
    median = {mode: {k: statistics.median(row[k] for row in found) for k in found[0]} for mode, found in rows.items()}
    print(f"checkpoint of {size / 1e6:.1f} MB (hidden {args.hidden}, {args.layers} layers, weights and Adam state, "
          f"{args.optimizer_format}), median of {args.repeats}")
    print()
    print("| async_save | save() ms | step ms | no save | waited ms | stopped ms | vs sync |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in (False, True):
        m = median[mode]
        print(f"| {str(mode).lower()} | {m['blocked']:.0f} | {m['during']:.1f} | {m['plain']:.1f} | "
              f"{m['waited']:.0f} | {m['stopped']:.0f} | {m['stopped'] / median[False]['stopped']:.2f}x |")
    shutdown_runtime()


if __name__ == "__main__":
    main()
