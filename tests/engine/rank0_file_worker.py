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
    ap.add_argument("--scenario", choices=("save_listing", "latest_marker", "latest_step", "latest_undecodable"),
                    required=True, nargs="+")
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
            found = save_listing(cfg, rt, undo) if scenario == "save_listing" else latest_read(cfg, rt.rank,
                                                                                            scenario, undo)
            result = {"found": found, "error": ""}
        except (checkpoint.CheckpointError, checkpoint.CheckpointWriteError) as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        for put_back in undo:
            put_back()
        (root / f"{scenario}.rank{rt.rank}").write_text(json.dumps(result))
    shutdown_runtime()


if __name__ == "__main__":
    main()
