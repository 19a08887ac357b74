"""What making a checkpoint durable costs a save: every file of the step fsynced before its rename
(but megatron's shards, which megatron fsyncs as it writes them),
the checkpoint directory after it, `latest` written through an fsynced temporary file (engine/
durable_file.py), against the same saves without those fsyncs, in one process on the CPU.

    python benchmarks/checkpoint_fsync.py [--hidden 64] [--layers 4] [--repeats 9] [--dir DIR]

A trainer (the engine's, gloo, one rank; tiny_cpu's model by default) trains one step, then saves
synchronously (weights, Adam state, trainer state) --repeats times in each mode, the modes taking
turns so that each sees the same machine load. Modes: `durable` (as the engine saves), `megatron's
fsyncs only` (the engine's own fsyncs and directory fsyncs left out: how it saved before; megatron
fsyncs the shards it writes), `no fsync` (none at all, megatron's included). Rows: the fsyncs one
save makes in this process, the median ms per save() and its ratio to the other two. The files go
to the directory given (default: a temporary one), whose device sets what an fsync costs: nothing
on tmpfs, a round trip to the server on NFS or Lustre.
"""
import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402

MODES = ("durable", "megatron's fsyncs only", "no fsync")


@contextlib.contextmanager
def mode(name: str):
    """The saves of `name`: engine.durable_file's syncs (or every fsync) replaced by nothing."""
    from engine import durable_file

    def plain_write(path, data, encoding="utf-8"):
        tmp = f"{path}.tmp"
        with open(tmp, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else
                                                                      {"encoding": encoding})) as f:
            f.write(data)
        os.replace(tmp, path)

    def nothing(*args, **kwargs):
        pass

    saved = {"sync_tree": durable_file.sync_tree, "sync_dir": durable_file.sync_dir,
             "write_file": durable_file.write_file}
    fsync = os.fsync
    done = []

    def counted(fd):
        fsync(fd)
        done.append(fd)

    if name != "durable":
        durable_file.sync_tree = durable_file.sync_dir = nothing
        durable_file.write_file = plain_write
    os.fsync = nothing if name == "no fsync" else counted
    try:
        yield done
    finally:
        os.fsync = fsync
        for k, v in saved.items():
            setattr(durable_file, k, v)


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--hidden", type=at_least(64), default=64, help="the model's hidden size (default %(default)s)")
    ap.add_argument("--layers", type=at_least(1), default=4, help="the model's layers (default %(default)s)")
    ap.add_argument("--repeats", type=at_least(1), default=9,
                    help="saves timed in each mode, the modes taking turns (default %(default)s)")
    ap.add_argument("--dir", default="", help="where the checkpoints go (default: a temporary directory)")
    args = ap.parse_args()
    if args.dir and not os.path.isdir(args.dir):  # the temporary directory's own error was a traceback
        ap.error(f"--dir {args.dir}: not a directory (the checkpoints go into a temporary directory made in it)")

    from engine.quiet import silence_known_warnings

    silence_known_warnings()  # before megatron is imported: some of its messages come at import
    from engine.config import EngineConfig, ParallelConfig
    from engine.config_load import load_config
    from engine.data import PackedGroups
    from engine.runtime import init_runtime, shutdown_runtime
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    rt = init_runtime(ParallelConfig(), seed=1)
    times = {m: [] for m in MODES}
    fsyncs = {m: 0 for m in MODES}
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        cfg = load_config(EngineConfig, None, [
            f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_attention_heads=4",
            "model.num_query_groups=2", f"model.ffn_hidden_size={args.hidden * 11 // 4}", "model.vocab_size=512",
            "train.global_batch=2", "train.micro_batch=1", "train.warmup_steps=1", "train.steps=2",
            "data.seq_length=128", "log.tensorboard=false", f"run_dir={tmp}", "checkpoint.resume=false",
            "checkpoint.async_save=false", "checkpoint.keep=2"])
        trainer = Trainer(cfg, rt, PackedGroups(random_groups(3, 16, 512, 128), 128), tmp, pad_id=0,
                          log=lambda *a, **k: None)
        trainer.train_step()
        trainer.save()  # the first save checks the sharding's integrity (later ones do not): not timed
        for r in range(args.repeats):
            for m in MODES[r % 3:] + MODES[:r % 3]:  # in turns, each first as often: the same machine load
                trainer.step += 1
                with mode(m) as done:
                    t = time.perf_counter()
                    trainer.save()
                    times[m].append((time.perf_counter() - t) * 1e3)
                fsyncs[m] = len(done)
        step = Path(trainer.save())
        files = [f for f in step.rglob("*") if f.is_file()]
        shards = sum(f.suffix == ".distcp" for f in files)
        size = sum(f.stat().st_size for f in files)
        trainer.loader.close()
        device = os.stat(tmp).st_dev
    shutdown_runtime()
    median = {m: statistics.median(v) for m, v in times.items()}
    print(f"checkpoint of {size / 1e6:.2f} MB in {len(files)} files ({shards} shards megatron fsyncs) "
          f"(hidden {args.hidden}, {args.layers} layers, weights and Adam state), "
          f"device {os.major(device)}:{os.minor(device)}, median of {args.repeats} saves")
    print()
    print("| saves | fsyncs a save | save() ms | vs megatron's fsyncs only | vs no fsync |")
    print("|---|---:|---:|---:|---:|")
    for m in MODES:
        print(f"| {m} | {fsyncs[m]} | {median[m]:.1f} | {median[m] / median[MODES[1]]:.2f}x | "
              f"{median[m] / median[MODES[2]]:.2f}x |")


if __name__ == "__main__":
    main()
