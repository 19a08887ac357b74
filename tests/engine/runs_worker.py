"""Several runs of tests/engine/dist_worker.py (through tests/engine/adam_kernel_worker.py where a run
records its AdamW kernel, through tests/engine/async_save_worker.py for its scenarios) one after the
other in one process, or in one torchrun launch: starting python, torch and megatron (and torchrun's
ranks) is most of a tiny run's time, so the runs of a test module that need no process of their own
share a launch. Each run meets the real parts: its own trainer, run directory and output file, and
megatron's parallel state set up for its own layout (torn down after it and put back as before the
first run, the process group kept), as in a process of its own; an error that ends a run (`refused`)
is recorded per rank and the next run goes on. The last run of a launch may end its process
(async_save_worker's `step_fails` on one rank). The Runtime with its groups, the model, optimizer,
gradient buffers, loader and Trainer are built anew from each run's own settings, from its --init
weights (or from the seed, which init_runtime sets again). What outlives a run is the same for any
layout: engine.cpu_compat's patches (applied once, as in any CPU process), entries of the
LayoutCaches (matched by the identity of a layout tensor they keep alive: never a later run's) and
torch.distributed's record of the groups torn down (the engine takes its groups from the Runtime,
never from there): comparing the module globals of megatron, engine and torch.distributed before the
first run and after each teardown showed nothing else.
Used by tests/engine/test_parallel_resume.py, tests/engine/test_checkpoint_async.py and the others
that import it, and by tests/engine/parity.py's run_layouts (the parity modules' layouts).
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

HERE = Path(__file__).resolve().parent
WORKERS = {"dist": "dist_worker", "adam": "adam_kernel_worker", "async_save": "async_save_worker"}


def run(tmp: Path, name: str, *overrides: str, init: str | None = None, evaluate: bool = True,
        save_init: str | None = None, worker: str = "dist", env: dict | None = None, refused: bool = False) -> dict:
    """One run of a launch, as tests/engine/parity.py's run_worker starts it (same settings, output
    `tmp/name.json`, run directory `tmp/name`); `worker` "adam" records AdamW's kernel (env
    ADAM_KERNEL=foreach: the foreach one, as tests/engine/test_optim_fused_resume.py's foreach_run);
    `refused`: a run expected to stop with an error, each rank's in `tmp/name.rankN`."""
    from tests.engine.parity import COMMON

    argv = ["--out", str(tmp / f"{name}.json")]
    argv += ["--init", init] if init else []
    argv += ["--save-init", save_init] if save_init else []
    argv += [] if evaluate else ["--no-eval"]
    return {"name": name, "worker": worker, "argv": [*argv, f"run_dir={tmp / name}", *COMMON, *overrides],
            "env": env or {}, "refused": refused}


def scenario(tmp: Path, name: str, scenario: str, *overrides: str, args=()) -> dict:
    """One async_save_worker scenario of a launch (each rank's result in `tmp/name.rankN`)."""
    argv = ["--out", str(tmp / name), "--scenario", scenario, *args, f"run_dir={tmp / (name + '_run')}", *overrides]
    return {"name": name, "worker": "async_save", "argv": argv, "env": {}, "refused": False}


def launch(tmp: Path, label: str, nproc: int, runs: list, timeout: int = 600, status: int = 0,
           env: dict | None = None) -> Path:
    """The runs in one process (`nproc` 1) or one torchrun launch over gloo; the launch must end within
    `timeout` seconds, and with `status` unless None (a run that fails unexpectedly fails it). `env`:
    set in every rank before triton and engine are imported, for all its runs (TRITON_INTERPRET: triton
    reads it as each @triton.jit function is defined, at import, not as a run calls it). -> its log."""
    import pytest

    from tests.engine import torchrun_scenario

    spec, log = tmp / f"{label}.runs.json", tmp / f"{label}.log"
    spec.write_text(json.dumps({"env": env or {}, "runs": runs}))
    proc = torchrun_scenario.start(Path(__file__), ["--runs", str(spec)], nproc, log)
    torchrun_scenario.wait(proc, log, timeout, label)
    if status is not None and proc.returncode != status:
        pytest.fail(f"{label}: exit {proc.returncode}, expected {status}:\n{log.read_text()[-8000:]}")
    return log


def result(tmp: Path, name: str, ranks=None, log: Path | None = None):
    """Run `name`'s output (rank 0's JSON, tmp/name.json), or with `ranks` those ranks' (refused
    runs, scenarios: tmp/name.rankN); one not written fails the test with the end of `log`."""
    import pytest

    files = [tmp / f"{name}.json"] if ranks is None else [tmp / f"{name}.rank{r}" for r in ranks]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        pytest.fail(f"not written: {missing}" + (f"\n{log.read_text()[-8000:]}" if log else ""))
    found = [json.loads(f.read_text()) for f in files]
    return found[0] if ranks is None else found


def _one(entry: dict, rank: int) -> None:
    import importlib

    import engine.optimizer_state
    import engine.trainer

    module = importlib.import_module(f"tests.engine.{WORKERS[entry['worker']]}")
    kept = {k: os.environ.get(k) for k in entry["env"]}
    # adam_kernel_worker patches these for its run; the next run meets the real ones
    patched = [(engine.optimizer_state, "use_fused_adam"), (engine.trainer, "step_with_norm")]
    originals = [getattr(m, a) for m, a in patched]
    if rank == 0:  # which run a failure's output belongs to
        print(f"runs_worker: run {entry['name']}", flush=True)
    sys.argv = [str(HERE / f"{WORKERS[entry['worker']]}.py"), *entry["argv"]]
    os.environ.update(entry["env"])
    try:
        module.main()
    except Exception as e:
        if not entry["refused"]:
            raise
        out = entry["argv"][entry["argv"].index("--out") + 1].removesuffix(".json")
        with open(f"{out}.rank{rank}", "w") as f:
            json.dump({"type": type(e).__name__, "error": str(e)}, f)
    else:
        assert not entry["refused"], f"{entry['argv']}: ran, expected to be refused"
    finally:
        for (m, a), original in zip(patched, originals):
            setattr(m, a, original)
        for k, v in kept.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_BEFORE_ANY_RUN: dict = {}  # megatron's parallel-state variables as the process started, set by main


def _between_runs() -> None:
    """shutdown_runtime's teardown, before each run but the first (the last one's worker has returned or
    raised, the workers' own calls do nothing): megatron's parallel state goes, the process group stays,
    and the state is put back to what it was before the first run (dist_worker.next_layout), whose
    garbage collection then finds the last run's model, optimizer and buffers unreachable. One teardown
    and one collection a run: each collection costs ~0.1 s of CPU a rank with torch and megatron loaded,
    and a teardown in the worker too had made the parity modules' launches ~10% slower (measured)."""
    from tests.engine.dist_worker import next_layout

    next_layout(_BEFORE_ANY_RUN)


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True, help="a JSON file: {env, runs: [run() or scenario()]}")
    spec = json.loads(Path(ap.parse_args().runs).read_text())
    os.environ.update(spec["env"])
    runs = spec["runs"]

    import engine.runtime

    from tests.engine.dist_worker import parallel_state_globals

    _BEFORE_ANY_RUN.update(parallel_state_globals())
    shutdown = engine.runtime.shutdown_runtime
    engine.runtime.shutdown_runtime = lambda: None  # the workers' call at the end of their run (see _between_runs)
    rank = int(os.environ.get("RANK", "0"))
    for i, entry in enumerate(runs):
        if i:
            _between_runs()
        _one(entry, rank)
    gc.collect()  # the last run's objects go while its process group is up, as every earlier run's did
    shutdown()


if __name__ == "__main__":
    main()
