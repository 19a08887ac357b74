"""SLURM's stop of a job step (scancel, the time limit): SIGTERM to every process of the step at once,
SIGKILL to those still there KillWait later (30 s by default). Under `polar pretrain --nproc 2` or
`polar score --nproc 2` those are polar, the torchrun agent it started (in a process group of its own,
polar passes its signal on: polar/launch.py) and each worker, which torchrun signals again as it shuts
them down. So torchrun is signalled twice (SLURM's and polar's), and torch's agent raises from its
signal handler each time, the second time inside the shutdown the first began. The run must still end
as for one SIGTERM: the step it reached saved once and `latest`, the rows of a score whole, every
process gone by the time polar exits 143 (SLURM ends a step when its task, polar, ends, and kills what
is left of it then), all inside KillWait.

The signals are sent here by pid, in a row (the pids gathered first), once the run is past its first
steps or rows: the nearest one machine comes to SLURM's group-wide send."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.stop_signal import EXIT_SIGTERM, REPEAT_ENV
from tests.engine import test_score_interrupt as score

ROOT = Path(__file__).resolve().parents[2]
KILL_WAIT = 30  # SLURM's KillWait default: the seconds between its SIGTERM and its SIGKILL
checkpoint, items = score.checkpoint, score.items  # fixtures


@pytest.fixture(scope="module")
def whole_output(tmp_path_factory, checkpoint, items) -> bytes:
    """An uninterrupted `polar score --nproc 2`'s output, for the rerun to match byte for byte
    (test_score_interrupt's whole_outputs makes the --nproc 1 one too, which nothing here reads)."""
    out = tmp_path_factory.mktemp("slurm_score_ref") / "whole.jsonl"
    proc = subprocess.run(score._cmd(checkpoint, items, out, 2), cwd=out.parent, env=score.ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_bytes()


def _closings(log: Path) -> int:
    """SIGTERMs torchrun has sent its workers: one line a worker each time its agent shuts them down."""
    return log.read_text().count("closing signal SIGTERM")


def _until(holds, proc: subprocess.Popen, log: Path, every: float = 0.005) -> None:
    """Waits for holds(), asking every `every` s: often inside torchrun's shutdown, whose window for the
    next signal is the rest of a step and a save; the wait for the run's start, seconds of it, asks
    less often (each ask reads the log)."""
    deadline = time.monotonic() + 300  # a bound on the wait, not a timing assertion
    while not holds() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(every)
    assert proc.poll() is None and holds(), log.read_text()[-6000:]


def _sigterm(procs: list) -> None:
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _stopped_like_slurm(cmd: list, cwd: Path, env: dict, started, scenario: str) -> tuple:
    """Runs `cmd` (a session of its own) until started(log) holds, then sends SIGTERM as `scenario` says;
    KILL_WAIT seconds later kills what is left, as SLURM does. (polar's status, its output, the processes
    of the run still there when polar ended)."""
    log = cwd / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    polar = psutil.Process(proc.pid)
    family = []
    try:
        _until(lambda: started(log.read_text()), proc, log, every=0.05)
        family = polar.children(recursive=True)  # torchrun, the workers and whatever they started
        torchrun = [p for p in family if p.ppid() == proc.pid]
        if scenario == "at once":
            _sigterm([polar, *family])
        else:  # polar's own SIGTERM, passed on, reaches torchrun once it is shutting its workers down
            _sigterm(family)
            _until(lambda: _closings(log) >= 2, proc, log)
            _sigterm([polar])
            if scenario == "scancel again":  # every process once more, inside the workers' repeat window
                _until(lambda: _closings(log) >= 4, proc, log)
                _sigterm([polar, *family])
        try:
            proc.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            pass
        left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for p in [polar, *family]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    assert torchrun and len(family) >= 3, (family, log.read_text()[-3000:])
    return proc.returncode, log.read_text(), left


@pytest.mark.parametrize("scenario", ["at once", "forward in shutdown", "scancel again"])
def test_sigterm_to_every_process_of_polar_pretrain_saves_once_and_ends_the_run_whole(tmp_path, scenario):
    """at once: one SIGTERM to each process; forward in shutdown: polar's (and so its forward to torchrun)
    comes once torchrun is shutting the workers down, where its agent raises a second time; scancel
    again: then every process once more. In the last, torchrun's shutdown was cut short (the agent's
    third raise ends it) and polar exited 143 with a worker still saving, which SLURM then kills. Its
    signals must all come inside the workers' repeat window (engine.stop_signal.repeat_s), set long
    here: the waits for torchrun's lines between them passed the default 5 s on a loaded machine, and
    the workers, signalled again after it, ended unsaved (the default's end at once, not a fault)."""
    cmd = [sys.executable, "-m", "polar.cli", "pretrain", "--nproc", "2", f"run_dir={tmp_path / 'run'}",
           "train.steps=1000", "synthetic.train_triplets=64", "synthetic.eval_triplets=16", "synthetic.prompts=50",
           "log.interval=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    if scenario == "scancel again":
        env[REPEAT_ENV] = "900"  # longer than the two waits before the last signal can last (_until's 300 s each)
    code, out, left = _stopped_like_slurm(cmd, tmp_path, env, lambda log: re.search(r"^step +2/", log, re.M),
                                          scenario)
    assert not left, (left, out[-6000:])
    assert code == EXIT_SIGTERM, out[-6000:]
    assert "[rank0]" not in out and "[rank1]" not in out, out[-6000:]  # no worker's traceback
    saved = re.findall(r"^saved checkpoint (\S+)$", out, re.M)
    stopped = re.findall(r"^stopped for SIGTERM at step (\d+): the checkpoint (\S+) is complete", out, re.M)
    assert len(saved) == 1 and len(stopped) == 1 and stopped[0][1] == saved[0], out[-6000:]
    ckpts = tmp_path / "run" / "checkpoints"
    name = f"step_{int(stopped[0][0]):08d}"
    assert saved[0] == str(ckpts / name), out[-6000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", name]
    assert (ckpts / "latest").read_text() == name


def test_sigterm_to_every_process_of_polar_score_keeps_whole_rows_and_the_rerun_matches(
        tmp_path, checkpoint, items, whole_output):
    out = tmp_path / "out.jsonl"
    partial = Path(f"{out}.partial")
    cmd = score._cmd(checkpoint, items, out, 2)
    code, log, left = _stopped_like_slurm(cmd, tmp_path, score.ENV, lambda _: score._rows(partial) >= score.CHUNK,
                                          "at once")
    assert not left, (left, log[-3000:])
    assert code == EXIT_SIGTERM, log[-3000:]
    assert "[rank0]" not in log and "[rank1]" not in log, log[-3000:]
    kept = score._said(log, "SIGTERM", partial)  # the rows written are whole, and as many as it says
    assert not out.exists()

    again = subprocess.run(cmd, cwd=tmp_path, env=score.ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {kept:,} of {score.LINES:,} lines are already scored" in again.stdout, again.stdout
    assert out.read_bytes() == whole_output
