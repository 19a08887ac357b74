"""File steps of a checkpoint that rank 0 alone takes, failing on rank 0 only, under torchrun over
gloo: the scenarios given, in turn in one launch (starting torchrun's ranks is most of a scenario's
time), each in a run directory of its own (ROOT/SCENARIO_run) with the OS call it refuses put back
after it; writes one JSON per scenario and rank (ROOT/SCENARIO.rankN): the error it raised.

`save_listing`: a training step, then a save whose new `.partial` directory rank 0 cannot list
(megatron lists it on rank 0 alone when the save starts). `latest_marker`, `latest_step`: a
checkpoint directory with two complete steps and `latest`, whose newest checkpoint every rank asks
rank 0 for (engine.checkpoint.latest_agreed, as a resume does) while rank 0 cannot open `latest`, or
cannot look into the step it names. `latest_undecodable`: the same, with a `latest` that is not
text (read by rank 0 only). The failing call is the OS's (os.listdir, io.open, os.stat), refused on
rank 0 only as a file system would refuse it (the tests run as root, whom chmod does not stop).
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
warnings.filterwarnings("ignore")

from engine.config import EngineConfig  # noqa: E402
from engine.config_load import load_config  # noqa: E402
from tests.engine.dist_worker import random_groups  # noqa: E402
from tests.engine.test_checkpoint import _step  # noqa: E402
from tests.engine.test_trainer import SMALL  # noqa: E402

# scenario -> (module, OS call, end of the paths rank 0 is refused)
REFUSED = {"save_listing": (os, "listdir", ".partial"), "latest_marker": (io, "open", f"{os.sep}latest"),
           "latest_step": (os, "stat", "trainer_state.json")}


def refuse_on_rank0(rank: int, module, name: str, path_end: str, undo: list) -> None:
    """From now on (until `undo`'s calls), `module.name` raises PermissionError on rank 0 for paths
    ending in `path_end`."""
    if rank != 0:
        return
    real = getattr(module, name)
    undo.append(lambda: setattr(module, name, real))

    def refused(path, *args, **kwargs):
        if not isinstance(path, int) and os.fsdecode(path).endswith(path_end):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real(path, *args, **kwargs)

    setattr(module, name, refused)


def save_listing(cfg, rt, undo: list) -> str:
    from engine.data import PackedGroups
    from engine.trainer import Trainer

    data = PackedGroups(random_groups(7, 20, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
    trainer = Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    trainer.train_step()
    trainer.step = 1
    refuse_on_rank0(rt.rank, *REFUSED["save_listing"], undo)
    trainer.save()
    trainer.finish_saves()
    return "saved"


# the files of a step that every rank would read alike at a resume, and the gather whose payload grows
# with the world size (a rank's answer each)
STEP_FILES = ("trainer_state.json", ".metadata")
READERS = {"read_state": os.path.join("engine", "checkpoint.py"),
           "tensors_metadata": os.path.join("engine", "checkpoint_load.py")}


def resume_reads(cfg, rt) -> dict:
    """A step saved (an LM head: its load asks which optional tensors the step holds), then resumed:
    the entry script's check of the run's data against it (engine.pretrain.check_resume_data), then a
    trainer's resume. -> what this rank did meanwhile: its opens of STEP_FILES through the engine's
    readers of them (engine.checkpoint.read_state, engine.checkpoint_load.tensors_metadata; megatron's
    load reads .metadata on every rank itself), and the engine's all_gather_object calls."""
    import traceback
    from types import SimpleNamespace

    import torch.distributed as dist

    from engine.config_load import updated
    from engine.data import PackedGroups
    from engine.pretrain import check_resume_data
    from engine.trainer import Trainer

    cfg.train = updated(cfg.train, {"aux_lm_weight": 0.1}, "train")
    data = PackedGroups(random_groups(7, 20, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
    first = Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    first.train_step()
    first.step = 1
    step = first.save()
    first.finish_saves()
    cfg.checkpoint.resume = True
    seen = {"opens": {name: 0 for name in STEP_FILES}, "all_gather_object": 0}

    def opened(event, args):
        if (event == "open" and isinstance(args[0], (str, bytes, os.PathLike))
                and os.fsdecode(args[0]).endswith(STEP_FILES)
                and any(f.name in READERS and f.filename.endswith(READERS[f.name]) for f in traceback.extract_stack())):
            seen["opens"][next(n for n in STEP_FILES if os.fsdecode(args[0]).endswith(n))] += 1

    gather = dist.all_gather_object

    def counted(*args, **kwargs):  # the engine's own (megatron's load makes some)
        if os.sep + "engine" + os.sep in traceback.extract_stack()[-2].filename:
            seen["all_gather_object"] += 1
        return gather(*args, **kwargs)

    recording = [True]
    sys.addaudithook(lambda event, args: opened(event, args) if recording[0] else None)
    dist.all_gather_object = counted
    try:
        check_resume_data(cfg, SimpleNamespace(train=data, tokenizer=None, pad_id=0), step)
        Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    finally:
        recording[0] = False
        dist.all_gather_object = gather
    return seen


def save_gathers(cfg, rt) -> dict:
    """Saves of one model, shared by its data-parallel replicas: its weights alone, then steps 1 and 2
    with their optimizer state; then step 2 loaded into a new trainer, both trained a step more.
    -> each save's all_gather_object calls (megatron's fully parallel save: which replica writes which
    shard, gathered over the data-parallel group, and its check of the whole save, gathered over the
    world), and whether both trainers' parameters are then the same."""
    import torch
    import torch.distributed as dist

    from engine import checkpoint
    from engine.data import PackedGroups
    from engine.trainer import Trainer

    data = PackedGroups(random_groups(7, 20, cfg.model.vocab_size, cfg.data.seq_length), cfg.data.seq_length)
    first = Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    gathers, gather = [], dist.all_gather_object

    def counted(*args, **kwargs):
        gathers[-1] += 1
        return gather(*args, **kwargs)

    dist.all_gather_object = counted
    try:
        gathers.append(0)
        checkpoint.save(str(Path(cfg.run_dir) / "weights"), 0, first.model, None, {"step": 0},
                        dp_group=rt.groups.dp)
        for step in (1, 2):
            first.train_step()
            first.step = step
            gathers.append(0)
            first.save()
            first.finish_saves()
    finally:
        dist.all_gather_object = gather
    cfg.checkpoint.resume = True
    second = Trainer(cfg, rt, data, cfg.run_dir, pad_id=0, log=lambda *a, **k: None)
    for trainer in (first, second):
        trainer.train_step()
    same = all(torch.equal(a, b) for a, b in zip(first.model[0].parameters(), second.model[0].parameters()))
    return {"gathers": gathers, "resumed_at": second.step, "same": same}


def latest_read(cfg, rank: int, scenario: str, undo: list) -> str:
    import torch.distributed as dist

    from engine import checkpoint

    root = Path(checkpoint.run_checkpoint_dir(cfg))
    if rank == 0:
        for n in (1, 2):
            _step(root, n)
        marker = b"\xffstep_00000001" if scenario == "latest_undecodable" else b"step_00000002"
        (root / checkpoint.LATEST).write_bytes(marker)
    dist.barrier()
    if scenario in REFUSED:
        refuse_on_rank0(rank, *REFUSED[scenario], undo)
    return checkpoint.latest_agreed(str(root))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--scenario", choices=("save_listing", "latest_marker", "latest_step", "latest_undecodable",
                                           "resume_reads", "save_gathers"), required=True, nargs="+")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [*SMALL, "train.steps=1", "checkpoint.resume=false", *args.overrides]

    from engine import checkpoint
    from engine.runtime import init_runtime, shutdown_runtime

    first = load_config(EngineConfig, None, base)
    rt = init_runtime(first.parallel, first.train.seed)
    root = Path(args.root)
    for scenario in args.scenario:
        cfg = load_config(EngineConfig, None, [*base, f"run_dir={root / (scenario + '_run')}"])
        undo: list = []
        try:
            if scenario in ("resume_reads", "save_gathers"):
                found = (resume_reads if scenario == "resume_reads" else save_gathers)(cfg, rt)
            elif scenario == "save_listing":
                found = save_listing(cfg, rt, undo)
            else:
                found = latest_read(cfg, rt.rank, scenario, undo)
            result = {"found": found, "error": ""}
        except (checkpoint.CheckpointError, checkpoint.CheckpointWriteError) as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        for put_back in undo:
            put_back()
        (root / f"{scenario}.rank{rt.rank}").write_text(json.dumps(result))
    shutdown_runtime()


if __name__ == "__main__":
    main()
