"""What the stop check costs a training step, and a batch of a periodic evaluation, over several ranks:
while the trainer's SIGTERM handler is in place (every fit in the main thread, engine.stop_signal.SigtermFlag)
each step, and each evaluation batch inside fit (engine.evaluation), all-reduces one scalar and reads it,
also with no train.stop_file or train.time_limit_s set; without the handler (or in one process) the check
is skipped.

    python benchmarks/stop_check.py [--nproc 2] [--hidden 256] [--layers 2] [--steps 20] [--repeats 5]
                                    [--checks 2000]

Launches itself under torchrun (gloo on the CPU; NCCL where each rank has a GPU). Rows: the check
alone (microseconds per call, mean of --checks calls), a training step (ms, median of --repeats
blocks of --steps steps) and an evaluation batch (ms, the training set evaluated as inside fit, median
of --repeats evaluations, each divided by its batches), with the handler off and on, alternated so that
both see the same machine load; the ratio column is on against off.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402


def trainer_for(args, rt, run_dir: str):
    from engine.config import EngineConfig
    from engine.config_load import load_config
    from engine.data import PackedGroups
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    cfg = load_config(EngineConfig, None, [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_attention_heads=8",
        "model.num_query_groups=4", f"model.ffn_hidden_size={4 * args.hidden}", "model.vocab_size=512",
        f"train.global_batch={2 * args.nproc}", "train.micro_batch=2", "train.warmup_steps=1",
        "train.steps=1000000", "data.seq_length=128", "log.tensorboard=false", f"run_dir={run_dir}",
        "checkpoint.resume=false"])
    data = PackedGroups(random_groups(3, 256, 512, 128), 128)
    trainer = Trainer(cfg, rt, data, run_dir, pad_id=0, log=lambda *a, **k: None)
    trainer.stops.begin()  # as inside fit: the check runs
    return trainer


def timed(trainer, on: bool, n: int, what) -> float:
    """Seconds per call of `what` over n calls, the handler installed or not."""
    import torch.distributed as dist

    if on:
        trainer.stops.sigterm.install()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(n):
        what()
    dist.barrier()
    elapsed = (time.perf_counter() - t) / n
    trainer.stops.sigterm.uninstall()
    return elapsed


def run(args) -> None:
    from engine.quiet import silence_known_warnings

    silence_known_warnings()  # before megatron is imported: some of its messages come at import
    from engine.config import ParallelConfig
    from engine.evaluation import EVAL_CHUNK, evaluate
    from engine.runtime import init_runtime, shutdown_runtime

    rt = init_runtime(ParallelConfig(), seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(args, rt, tmp)

        def step():
            trainer.train_step()
            trainer.step += 1

        for _ in range(2):  # lazy initialisation (optimizer state, caches)
            step()
        data = trainer.loader.source
        batches = -(-len(range(0, len(data), rt.dp)) // EVAL_CHUNK)

        def evaluation():  # as fit's periodic one: a stop check before each batch
            evaluate(trainer, data, partial(trainer.stops.agree, False))

        check = {False: [], True: []}
        steps = {False: [], True: []}
        evals = {False: [], True: []}
        for _ in range(args.repeats):
            for on in (False, True):
                check[on].append(timed(trainer, on, args.checks, lambda: trainer.stops.at_step(trainer.step)))
                steps[on].append(timed(trainer, on, args.steps, step))
                evals[on].append(timed(trainer, on, 1, evaluation) / batches)
        trainer.loader.close()
    if rt.is_main:
        c = {on: statistics.mean(v) * 1e6 for on, v in check.items()}
        s = {on: statistics.median(v) * 1e3 for on, v in steps.items()}
        e = {on: statistics.median(v) * 1e3 for on, v in evals.items()}
        print(f"{rt.world_size} ranks ({rt.device.type}, {'nccl' if rt.is_cuda else 'gloo'}), hidden {args.hidden}, "
              f"{args.layers} layers, {2 * args.nproc} packed sequences of 128 tokens per step")
        print()
        print("| measure | handler off | handler on | on / off |")
        print("|---|---:|---:|---:|")
        print(f"| stop check alone, us per call (mean of {args.repeats} x {args.checks}) | {c[False]:.1f} | "
              f"{c[True]:.1f} | {c[True] / max(c[False], 1e-9):.0f}x |")
        print(f"| training step, ms (median of {args.repeats} x {args.steps}) | {s[False]:.2f} | {s[True]:.2f} | "
              f"{s[True] / s[False]:.3f}x |")
        print(f"| evaluation batch of {EVAL_CHUNK} packed sequences per rank, ms (median of {args.repeats} "
              f"evaluations of {batches} batches) | {e[False]:.2f} | {e[True]:.2f} | {e[True] / e[False]:.3f}x |")
        print()
        print(f"the check alone is {(c[True] - c[False]) / 1e3 / s[False]:.2%} of a step and "
              f"{(c[True] - c[False]) / 1e3 / e[False]:.2%} of an evaluation batch")
    shutdown_runtime()


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--nproc", type=at_least(2), default=2, help="ranks (gloo, on the CPU) (default %(default)s)")
    ap.add_argument("--hidden", type=at_least(64), default=256, help="the model's hidden size (default %(default)s)")
    ap.add_argument("--layers", type=at_least(1), default=2, help="the model's layers (default %(default)s)")
    ap.add_argument("--steps", type=at_least(1), default=20, help="training steps per timed block")
    ap.add_argument("--repeats", type=at_least(1), default=5,
                    help="timed blocks of each kind, the median shown (default %(default)s)")
    ap.add_argument("--checks", type=at_least(1), default=2000, help="stop checks per timed block")
    args = ap.parse_args()
    if "LOCAL_RANK" in os.environ:
        return run(args)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={args.nproc}", os.path.abspath(__file__), *sys.argv[1:]],
                          env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
