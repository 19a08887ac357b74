"""A SIGTERM that ends the main rank before its wandb run is closed finishes the run as failed (exit code 143)
first (engine.wandb_log.SigtermWatch): torchrun sends SIGTERM to the other workers when one fails, and SIGKILL
30 s later; a main thread inside a collective the failed rank never joins never runs fit's Python handler,
and after fit SIGTERM ended the process at once; either way the run was left open (offline: never finished,
no exit record, its last steps' rows unwritten). A SIGTERM that fit's main thread takes up is still its
saved stop, the run finished as before (exit code 0), however long the save.

Runs tests/engine/wandb_sigterm_worker.py (engine/pretrain.py with hooks) under torchrun over gloo, wandb
offline; the offline run's records are read with tests/engine/wandb_records.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.torchrun_scenario import kill, start, wait
from tests.engine.wandb_records import exit_code, finished_runs, history

WORKER = Path(__file__).with_name("wandb_sigterm_worker.py")
SMALL = ["synthetic.train_triplets=64", "synthetic.eval_triplets=16", "synthetic.prompts=50", "model.num_layers=1",
         "log.interval=1", "log.tensorboard=false", "log.wandb_project=polar-test"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here
    monkeypatch.setenv("WANDB_SILENT", "true")


def _start(tmp: Path, scenario: str, nproc: int, steps: int):
    log = tmp / f"{scenario}.log"
    proc = start(WORKER, ["--scenario", scenario, "--out", str(tmp / scenario), f"run_dir={tmp / 'run'}", *SMALL,
                          f"train.steps={steps}"], nproc, log)
    return proc, log


def _finished(tmp: Path, timeout: float = 60, running=None) -> Path | None:
    """The offline run's file once it holds the run's exit record; None after `timeout` s, or once `running`
    says the run's process ended without one (wandb_records.finished_runs)."""
    runs = finished_runs(tmp / "run", 1, timeout, running)
    return runs[0] if len(runs) == 1 and exit_code(runs[0]) is not None else None


def test_a_main_rank_inside_a_collective_at_sigterm_finishes_its_wandb_run_as_failed(tmp_path):
    """Rank 1 hangs in step 2; rank 0 waits in the step's gradient collective when SIGTERM comes, and is
    then killed (as torchrun's SIGKILL would): its run holds step 1 and exit code 143 (before: no exit record
    and no rows, the step's row still held by wandb)."""
    proc, log = _start(tmp_path, "stuck", 2, steps=3)
    try:
        run = _finished(tmp_path, 240, running=lambda: proc.poll() is None)
    finally:
        kill(proc)
    assert run is not None, log.read_text()[-6000:]
    assert exit_code(run) == 143, log.read_text()[-6000:]
    assert [row["_step"] for row in history(run)] == [1]


def test_a_sigterm_in_the_final_evaluation_after_a_rank_failed_finishes_the_wandb_run_first(tmp_path):
    """Rank 1's final evaluation raises while rank 0's runs: torchrun's SIGTERM still ends rank 0 by the
    signal (-15), after its run was finished as failed (exit code 143) with both steps' rows (before: no exit
    record, no rows)."""
    proc, log = _start(tmp_path, "final", 2, steps=2)
    wait(proc, log, 300, "final")
    out = log.read_text()
    assert proc.returncode != 0 and "RuntimeError: rank 1 failed in its final evaluation" in out, out[-6000:]
    assert "exitcode  : -15" in out, out[-6000:]  # torchrun's report of rank 0
    run = _finished(tmp_path)
    assert run is not None and exit_code(run) == 143, out[-6000:]
    assert [row["_step"] for row in history(run)] == [1, 2]


def test_a_sigterm_fit_takes_up_is_a_stop_finished_as_before_however_long_its_save(tmp_path):
    """SIGTERM in step 2, the save it stops with longer than the watch's wait: exit 143 (saved, the same
    command resumes) and the wandb run finished by the main thread with exit code 0."""
    proc, log = _start(tmp_path, "graceful", 1, steps=4)
    wait(proc, log, 300, "graceful")
    out = log.read_text()
    assert proc.returncode == 143 and "stopped for SIGTERM at step 2" in out, out[-6000:]
    run = _finished(tmp_path)
    assert run is not None and exit_code(run) == 0, out[-6000:]
    assert [row["_step"] for row in history(run)] == [1, 2]


# The main rank as SigtermWatch meets it during fit: fit's handler only notes a SIGTERM (here: nothing says it
# did), the watch finishes the run; then torchrun's or SLURM's next SIGTERM comes.
_AFTER_THE_WATCH = """
import os, signal, sys, time
import engine.wandb_log as wandb_log
wandb_log.ANSWER_S = 0.3
signal.signal(signal.SIGTERM, lambda signum, frame: None)
log = wandb_log.WandbLog("polar-test", "", "", sys.argv[1], sigterm_answered=lambda: False)
assert log.watch is not None
os.kill(os.getpid(), signal.SIGTERM)
deadline = time.monotonic() + 60
while log.run is not None and time.monotonic() < deadline:
    time.sleep(0.05)
log.watch.thread.join(60)  # its thread has ended
print("finished by the watch:", log.run is None, flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
"""


def test_signals_after_the_watch_finished_the_run_say_nothing(tmp_path):
    """Once SigtermWatch's thread had finished the run it closed its end of the wakeup socket: every later
    signal's wakeup write failed, and Python printed 'Exception ignored when trying to write to the signal
    wakeup fd' with a BrokenPipeError for each, in the logs of a rank waiting for its SIGKILL."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "run").mkdir()
    proc = subprocess.run([sys.executable, "-c", _AFTER_THE_WATCH, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0 and "finished by the watch: True" in proc.stdout, proc.stdout + proc.stderr
    assert "wakeup fd" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    run = _finished(tmp_path)
    assert run is not None and exit_code(run) == 143
