"""Runs one scenario of a test worker script under torchrun over gloo (or as one process), each rank
writing its result as JSON to OUT.rankN; a run where a rank waits for good is killed at a timeout and
fails the test. Used by tests/engine/test_checkpoint_async.py (tests/engine/async_save_worker.py) and
tests/engine/test_checkpoint_rank0.py (tests/engine/rank0_file_worker.py); tests/engine/test_stop_signal.py
and tests/engine/test_stop_signal_eval.py start their runs with `start`, signal them while they train and
read each rank's result with `finish`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.parity import ROOT


def start(script: Path, args, nproc: int, log: Path) -> subprocess.Popen:
    """`script` with `args` started under torchrun over gloo (`nproc` ranks on this machine) or, for
    one, as a plain process; its output goes to `log`, and it runs in a session of its own (kill ends
    it whole)."""
    cmd = [str(script), *args]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
           if nproc > 1 else [sys.executable, *cmd])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # output to a file, not a pipe: a process the run left behind would hold a pipe open, and the
    # test would wait for it instead of naming it
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """Ends a run `start` began, every process of it: torchrun starts each worker in a session of its
    own, which a kill of torchrun's session misses (a rank waiting for good outlived the test)."""
    import psutil

    try:
        under = psutil.Process(proc.pid).children(recursive=True)  # before they lose their parent
    except psutil.NoSuchProcess:
        under = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in under:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def wait(proc: subprocess.Popen, log: Path, timeout: int, name: str = "") -> None:
    """Waits for a run `start` began; one still going after `timeout` seconds (a rank waiting for good)
    is killed with every process it started and fails the test, with the end of its log."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail(f"{name}{': ' if name else ''}still running after {timeout} s (a rank waiting for good):\n"
                    f"{log.read_text()[-6000:]}")


def finish(proc: subprocess.Popen, log: Path, results: list, timeout: int = 300) -> list:
    """Each rank's result (JSON files `results`), once the run has ended (`wait`); each must exist."""
    wait(proc, log, timeout)
    assert all(f.exists() for f in results), log.read_text()[-6000:]
    return [json.loads(f.read_text()) for f in results]


def run_scenario(worker: Path, tmp: Path, scenario: str, nproc: int, *overrides: str, name: str = "", args=(),
                 timeout: int = 600, expected: int | None = None, status: int | None = None) -> list:
    """Each rank's result of the worker's `scenario` (None for a rank past the first `expected`
    that wrote none); a run still going after `timeout` seconds (a rank waiting for good) is killed
    with every process it started and fails the test. `status`: torchrun's exit status the run must
    end with (a rank that wrote its result and then died, gloo's abort at exit say, fails it)."""
    name = name or scenario
    out = tmp / name
    log = tmp / f"{name}.log"
    proc = start(worker, ["--out", str(out), "--scenario", scenario, *args, f"run_dir={tmp / (name + '_run')}",
                          *overrides], nproc, log)
    wait(proc, log, timeout, name)
    results = [out.with_name(f"{out.name}.rank{r}") for r in range(nproc)]
    assert all(f.exists() for f in results[:expected]), f"{name}:\n{log.read_text()[-6000:]}"
    assert status is None or proc.returncode == status, f"{name}: exit {proc.returncode}:\n{log.read_text()[-6000:]}"
    return [json.loads(f.read_text()) if f.exists() else None for f in results]
