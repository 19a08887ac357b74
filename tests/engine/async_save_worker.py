"""Background checkpoint saves (checkpoint.async_save=true) in a training run under torchrun, at the
points a whole run does not reach on its own; writes one JSON per rank (OUT.rankN).

`snapshot`: after one step, a background save whose writer is held back (until the marker file
exists) while the trainer changes every weight and optimizer value in place; the save is then
finished and loaded back. `failing`: a run saving every step whose second save cannot write (a
file size limit, which the kernel enforces as it would a full disk: on the background save's writer
process, or on the trainer while it saves synchronously). `killed`: a complete save at step 1,
then the process kills itself while the writer of step 2 is held back. `rank0_file`: a save whose
`.metadata` or `metadata.json` rank 0 alone cannot write. `step_fails`: the training step after a
background save raises on every rank, or on one.

`cases`: several of these (not `killed`, nor `step_fails` on one rank: each ends its process) one
after the other in one launch, each with a trainer and a run directory of its own; starting torch,
megatron and the ranks' group is most of a scenario's time. One JSON per rank, by case name.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import sys
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

from engine.config import EngineConfig  # noqa: E402
from engine.config_load import load_config  # noqa: E402
from tests.engine.dist_worker import random_groups  # noqa: E402
from tests.engine.test_trainer import SMALL  # noqa: E402


def _tensors(trainer) -> list:
    """Every weight and optimizer tensor the save holds, as the trainer updates them in place."""
    found = [p for c in trainer.model for p in c.parameters()]
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = opt.optimizer
        found += [p for g in inner.param_groups for p in g["params"]]
        found += [v for st in inner.state.values() for v in st.values() if hasattr(v, "add_") and v.dim() > 0]
    return found


def _held_writer(marker: str) -> None:
    """megatron's file writer, waiting for `marker` first (in whichever process or thread writes)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data

    def held(*args, **kwargs):
        while not os.path.exists(marker):
            time.sleep(0.05)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(held)


def snapshot(trainer, rank: int, marker: str) -> dict:
    import torch
    import torch.distributed as dist

    from engine import checkpoint, checkpoint_load

    trainer.train_step()
    trainer.step = 1
    before = [t.detach().clone() for t in _tensors(trainer)]
    _held_writer(marker)
    path = trainer.save()
    pending = bool(trainer.saves.pending)
    with torch.no_grad():
        for t in _tensors(trainer):
            t.add_(1.0)
    dist.barrier()
    if rank == 0:
        open(marker, "w").close()
    trainer.finish_saves()
    complete = checkpoint.latest(trainer.ckpt_dir) == path
    checkpoint_load.load(path, trainer.model, trainer.optimizer)
    after = _tensors(trainer)
    return {"pending_after_save": pending, "complete": complete, "tensors": len(before),
            "changed": sum(not torch.equal(a, b) for a, b in zip(before, after))}


def killed(trainer, out: str) -> None:
    from engine import checkpoint_async

    for step in (1, 2):
        trainer.train_step()
        trainer.step = step
        if step == 2:
            _held_writer(out + ".release")  # never made
        trainer.save()
    writer = trainer.saves._calls.async_calls[0].async_caller.process.pid
    with open(out + ".rank0", "w") as f:
        json.dump({"writer": writer, "results_server": checkpoint_async._SERVER[0]._process.pid}, f)
    os.kill(os.getpid(), signal.SIGKILL)


def failing_writes(trainer) -> dict:
    """The `failing` scenario: the run's second save cannot write; in the background its writer
    process, saved synchronously the trainer itself, while it saves."""
    from engine import checkpoint

    real_save, calls = trainer.save, []

    def save():
        calls.append(trainer.step)
        if len(calls) != 2:
            return real_save()
        if trainer.saves is None:
            with _files_limited():
                return real_save()
        _SMALL_FILES[0] = True  # the writer process forked by this save only
        try:
            return real_save()
        finally:
            _SMALL_FILES[0] = False

    trainer.save = save
    error, notes = "", []
    try:
        trainer.fit()
    except checkpoint.CheckpointWriteError as e:
        error, notes = str(e), getattr(e, "__notes__", [])
    return {"error": error, "notes": notes, "saves": calls, "latest": checkpoint.latest(trainer.ckpt_dir),
            "partials": [p.name for p in checkpoint.partial_saves(trainer.ckpt_dir)]}


def rank0_file(trainer, rank: int, name: str) -> dict:
    """A complete save at step 1, then one at step 2 whose file `name` (`.metadata` or
    `metadata.json`, which rank 0 alone writes when the shards are written) cannot be written on
    rank 0: a directory of that name is in its way, made by rank 0's shard writer."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from engine import checkpoint

    error = ""
    for step in (1, 2):
        trainer.train_step()
        trainer.step = step
        if step == 2 and rank == 0:
            write = FileSystemWriterAsync.write_preloaded_data

            def in_the_way(transform_list, local_proc_idx, write_bucket, *args, **kwargs):
                os.makedirs(os.path.join(os.path.dirname(write_bucket[0]), name), exist_ok=True)
                return write(transform_list, local_proc_idx, write_bucket, *args, **kwargs)

            FileSystemWriterAsync.write_preloaded_data = staticmethod(in_the_way)
        try:
            trainer.save()
            trainer.finish_saves()
        except checkpoint.CheckpointWriteError as e:
            error = str(e)
    return {"error": error, "latest": checkpoint.latest(trainer.ckpt_dir),
            "partials": [p.name for p in checkpoint.partial_saves(trainer.ckpt_dir)]}


def step_fails(trainer, rank: int, failing: list, out: str) -> dict:
    """A run saving every step: step 1's save completes, step 2's writer is held back (until the
    marker file exists), and step 3's loss raises on the `failing` ranks, which first make the
    marker when every rank fails (the write goes on) and not otherwise (a write that takes long)."""
    import torch.distributed as dist

    import engine.trainer
    from engine import checkpoint

    marker, loss, real_save = out + ".release", engine.trainer.contrastive_loss, trainer.save

    def save():
        if trainer.step == 2:
            _held_writer(marker)
        path = real_save()
        with open(f"{out}.writer{rank}", "w") as f:  # the writer a failed run must not leave behind
            f.write(str(trainer.saves._calls.async_calls[0].async_caller.process.pid))
        return path

    def failing_loss(*args, **kwargs):
        if trainer.step == 2 and rank in failing:
            if len(failing) == trainer.rt.world_size:
                open(marker, "w").close()
            raise RuntimeError("the loss of step 3 failed")
        return loss(*args, **kwargs)

    trainer.save, engine.trainer.contrastive_loss = save, failing_loss
    asked, default_store = {}, dist.distributed_c10d._get_default_store

    class Counted:  # the job's store, its requests counted by kind (the stop's agreement goes through it)
        def __init__(self, store):
            self.store = store

        def __getattr__(self, name):
            def call(*args, **kwargs):
                asked[name] = asked.get(name, 0) + 1
                return getattr(self.store, name)(*args, **kwargs)
            return call

    dist.distributed_c10d._get_default_store = lambda: Counted(default_store())
    try:
        trainer.fit()
    except RuntimeError as e:
        result = {"error": str(e), "notes": getattr(e, "__notes__", []),
                  "latest": checkpoint.latest(trainer.ckpt_dir),
                  "partials": [p.name for p in checkpoint.partial_saves(trainer.ckpt_dir)], "asked": asked}
        if len(failing) < trainer.rt.world_size:  # the others wait in the step: the error ends the process
            with open(f"{out}.rank{rank}", "w") as f:
                json.dump(result, f)
            raise
        return result
    finally:
        dist.distributed_c10d._get_default_store = default_store
    return {"error": ""}


_SMALL_FILES = [False]  # `failing`: the writers forked while set find their files limited to 1 KiB


def _limit_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))


def _small_files() -> None:
    if _SMALL_FILES[0]:
        _limit_files()


@contextlib.contextmanager
def _files_limited():
    """This process's files limited to 1 KiB while in the block (the next case writes as usual)."""
    handler, limits = signal.getsignal(signal.SIGXFSZ), resource.getrlimit(resource.RLIMIT_FSIZE)
    _limit_files()
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def run_case(trainer, rank: int, scenario: str, out: str, file: str = ".metadata", failing: str = "0,1"):
    """One scenario on `trainer`; what it patches in megatron and the engine is put back after it,
    so that the next case of the launch meets the real parts."""
    import engine.trainer
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write, loss = FileSystemWriterAsync.__dict__["write_preloaded_data"], engine.trainer.contrastive_loss
    try:
        if scenario == "snapshot":
            return snapshot(trainer, rank, out + ".release")
        if scenario == "killed":
            return killed(trainer, out)
        if scenario == "rank0_file":
            return rank0_file(trainer, rank, file)
        if scenario == "step_fails":
            return step_fails(trainer, rank, [int(r) for r in failing.split(",")], out)
        return failing_writes(trainer)
    finally:
        FileSystemWriterAsync.write_preloaded_data, engine.trainer.contrastive_loss = write, loss
        _SMALL_FILES[0] = False


SCENARIOS = ("snapshot", "failing", "killed", "rank0_file", "step_fails")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenario", choices=(*SCENARIOS, "cases"), required=True)
    ap.add_argument("--file", default=".metadata", help="rank0_file: the file rank 0 cannot write")
    ap.add_argument("--failing", default="0,1", help="step_fails: the ranks whose step 3 fails")
    ap.add_argument("--agree-s", type=float, default=None,
                    help="step_fails: how long a rank that stops waits for the others (engine default if unset)")
    ap.add_argument("--cases", default="[]",
                    help='cases: a JSON list of [name, scenario, {"file": .., "failing": ..}, [overrides]]')
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    defaults = [*SMALL, "train.steps=3", "checkpoint.resume=false", "checkpoint.async_save=true"]
    cfg = load_config(EngineConfig, None, defaults + args.overrides)
    if args.scenario == "cases":
        cases = json.loads(args.cases)
        for name, scenario, _, _ in cases:
            assert scenario in SCENARIOS and scenario != "killed", f"{name}: {scenario} ends its process"
    else:
        cases = [["", args.scenario, {"file": args.file, "failing": args.failing}, []]]

    from engine import checkpoint_async
    from engine.data import PackedGroups
    from engine.runtime import init_runtime, shutdown_runtime
    from engine.trainer import Trainer

    if args.agree_s is not None:
        checkpoint_async.AGREE_S = args.agree_s
    os.register_at_fork(after_in_child=_small_files)
    rt = init_runtime(cfg.parallel, cfg.train.seed)
    results, trainers = {}, []  # each case's trainer kept: engine.checkpoint knows a model by its id
    for name, scenario, options, overrides in cases:
        case = load_config(EngineConfig, None, defaults + args.overrides + overrides
                           + ([f"run_dir={os.path.join(cfg.run_dir, name)}"] if name else []))
        assert (case.parallel.tp, case.parallel.pp, case.parallel.vpp) == (cfg.parallel.tp, cfg.parallel.pp,
                                                                          cfg.parallel.vpp), name
        data = PackedGroups(random_groups(7, 40, case.model.vocab_size, case.data.seq_length), case.data.seq_length)
        trainer = Trainer(case, rt, data, case.run_dir, pad_id=0, log=lambda *a, **k: None)
        trainers.append(trainer)
        results[name] = run_case(trainer, rt.rank, scenario, f"{args.out}.{name}" if name else args.out, **options)
    with open(f"{args.out}.rank{rt.rank}", "w") as f:
        json.dump(results if args.scenario == "cases" else results[""], f)
    shutdown_runtime()


if __name__ == "__main__":
    main()
