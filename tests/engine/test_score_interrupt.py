"""Ctrl-C and SIGTERM to `polar score` and `polar eval` (engine/interrupt.py): one line saying what is
kept and that the same command continues, and the signal's status (130, 143), not a traceback on
every rank or a silent end; with --nproc above 1 polar passes the signal on to torchrun and waits for
it (polar/launch.py), where it exited at once and torchrun and its workers scored on without it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.engine import test_score_chunks

ROOT = Path(__file__).parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
LINES, CHUNK = 300, 10  # a signal after the first chunk finds the run far from its end
# the fixture of the tiny model's checkpoint alone, for tests/polar/test_slurm_sigterm.py (this module's
# tests take theirs from `made`)
checkpoint = test_score_chunks.checkpoint
LINE = re.compile(r"interrupted by (SIG\w+): (\d+) of ([\d,]+) lines are kept in (\S+); the same command continues")


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("score_interrupt_input") / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"prompt {i % 7}: " + "q" * int(rng.integers(0, 40)),
                                        "reference": f"ref {i % 5}",
                                        "candidates": [f"answer {j} " + "a" * int(rng.integers(0, 60))
                                                       for j in range(1 + i % 3)]}) + "\n" for i in range(LINES)))
    return path


def _cmd(checkpoint: str, inp: Path, out: Path, nproc: int) -> list:
    return [sys.executable, "-m", "polar.cli", "score", "--checkpoint", checkpoint, "--input", str(inp),
            "--output", str(out), "--tokenizer", "byte", "--chunk-lines", str(CHUNK), "--nproc", str(nproc)]


def _rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _as_a_terminals_job() -> None:
    """SIGINT at its default action, as in a job a terminal starts: a test run started in the
    background by a script (CI's `cmd &`) has SIGINT ignored, which its children inherit and which
    polar and the engine rightly keep (the Ctrl-C cases then scored to the end and exited 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted(cmd: list, cwd: Path, when, send) -> tuple:
    """Runs `cmd` (in a session of its own, as a terminal's job is a process group of its own) until
    when() holds, then send(pid); (exit status, output, the processes it had started then and still
    running once it ended). Whatever is left is killed."""
    log = cwd / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_as_a_terminals_job)
    family = []
    try:
        deadline = time.time() + 300
        while not when() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, log.read_text()[-3000:]
        family = psutil.Process(proc.pid).children(recursive=True)
        send(proc.pid)
        proc.wait(timeout=120)
        left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for p in family + ([psutil.Process(proc.pid)] if proc.poll() is None else []):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    return proc.returncode, log.read_text(), left


def _said(out: str, sig: str, partial: Path) -> int:
    """The rows the one interrupted line says are kept, checked against the partial output."""
    said = LINE.findall(out)
    assert len(said) == 1, out[-3000:]
    name, kept, total, where = said[0]
    assert (name, total, where) == (sig, f"{LINES:,}", str(partial)), said
    assert 0 < int(kept) < LINES and int(kept) % CHUNK == 0, said
    assert _rows(partial) == int(kept)  # the rows written are whole: no torn last row
    return int(kept)


# the tiny model's checkpoint made (tests/polar/serve/make_checkpoint.py), then `polar score` at --nproc 1
# in the same process, which runs it in its own (argv: the run folder, polar's arguments)
MADE = """
import sys

from polar.cli import main
from tests.polar.serve.make_checkpoint import main as make

make(sys.argv[1])
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory, items) -> tuple:
    """The tiny model's checkpoint and an uninterrupted --nproc 1 run's output, made in one process
    (a process spends seconds of CPU before it builds the model or scores a line)."""
    tmp = tmp_path_factory.mktemp("score_interrupt_made")
    ckpt, out = str(tmp / "run" / "checkpoints"), tmp / "whole.jsonl"
    proc = subprocess.run([sys.executable, "-c", MADE, str(tmp / "run"), *_cmd(ckpt, items, out, 1)[3:]], cwd=tmp,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt, out.read_bytes()


@pytest.fixture(scope="module")
def whole_outputs(tmp_path_factory, made, items) -> dict:
    """An uninterrupted run's output at each --nproc, for the reruns to match byte for byte."""
    out = tmp_path_factory.mktemp("score_interrupt_ref") / "whole.jsonl"
    proc = subprocess.run(_cmd(made[0], items, out, 2), cwd=out.parent, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {1: made[1], 2: out.read_bytes()}


def test_an_interrupted_single_process_run_says_what_it_keeps_and_exits_with_the_signals_status(
        tmp_path, made, items, whole_outputs):
    """Ctrl-C, then SIGTERM to the rerun that continues it: each run says in one line what it keeps
    and exits with its signal's status; the rerun after both continues where the second ended, and
    the output is byte for byte an uninterrupted run's."""
    out = tmp_path / "out.jsonl"
    partial = Path(f"{out}.partial")
    cmd = _cmd(made[0], items, out, 1)
    kept = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        code, log, _ = _interrupted(cmd, tmp_path, lambda after=kept: _rows(partial) >= after + CHUNK,
                                    lambda pid: os.kill(pid, sig))
        assert code == 128 + sig, log[-3000:]  # was -2 after a KeyboardInterrupt traceback, -15 without a word
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
        if kept:
            assert f"resuming: {kept:,} of {LINES:,} lines are already scored" in log, log[-3000:]
        kept = _said(log, sig.name, partial)
        # said before the model is loaded, where nothing else was said for minutes at 7B
        assert log.index("checking every line of") < log.index("loading ") < log.index("interrupted by"), log

    again = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {kept:,} of {LINES:,} lines are already scored" in again.stdout, again.stdout
    assert out.read_bytes() == whole_outputs[1]


def test_sigterm_to_polar_reaches_torchrun_whose_workers_keep_their_rows_and_the_rerun_continues(
        tmp_path, made, items, whole_outputs):
    """`kill PID` of the polar command (a scheduler's stop): polar exited 143 at once, torchrun
    (reparented to PID 1) and both workers scored and wrote the whole output after it."""
    out = tmp_path / "out.jsonl"
    partial = Path(f"{out}.partial")
    cmd = _cmd(made[0], items, out, 2)
    code, log, left = _interrupted(cmd, tmp_path, lambda: _rows(partial) >= CHUNK,
                                   lambda pid: os.kill(pid, signal.SIGTERM))
    assert not left, (left, log[-3000:])
    assert code == 143, log[-3000:]
    assert "[rank0]" not in log and "[rank1]" not in log, log[-3000:]  # no worker's traceback
    kept = _said(log, "SIGTERM", partial)
    assert not out.exists()

    again = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {kept:,} of {LINES:,} lines are already scored" in again.stdout, again.stdout
    assert out.read_bytes() == whole_outputs[2]


def test_ctrl_c_under_torchrun_reaches_every_worker_once(tmp_path, made, items):
    """A terminal's Ctrl-C signals the whole foreground process group: polar passes it on to torchrun
    (in a group of its own, so it receives it once), which passes it to each worker; every worker
    stops with its rows whole, one line is said, and polar exits 130."""
    out = tmp_path / "out.jsonl"
    partial = Path(f"{out}.partial")
    code, log, left = _interrupted(_cmd(made[0], items, out, 2), tmp_path, lambda: _rows(partial) >= CHUNK,
                                   lambda pid: os.killpg(pid, signal.SIGINT))
    assert not left, (left, log[-3000:])
    assert code == 130, log[-3000:]
    assert "KeyboardInterrupt" not in log and "[rank0]" not in log, log[-3000:]
    _said(log, "SIGINT", partial)


RANKED = {"prompt": "Name a prime.", "category": "small", "responses": ["7", "8", "9"]}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_evaluation_says_so_in_one_line(tmp_path, made, sig):
    """polar eval keeps nothing before its end (the accuracy needs every record): one line, the status."""
    inp = tmp_path / "ranked.jsonl"
    # records enough that the evaluation is still running when the signal comes after "loading ": one
    # record was scored before it on a loaded machine (the run ended 0, the signal too late)
    inp.write_text((json.dumps(RANKED) + "\n") * 2000)
    code, log, _ = _interrupted(
        [sys.executable, "-m", "polar.cli", "eval", "--checkpoint", made[0], "--input", str(inp), "--tokenizer",
         "byte", "--json", str(tmp_path / "acc.json")], tmp_path,
        lambda: "loading " in (tmp_path / "log.txt").read_text(), lambda pid: os.kill(pid, sig))
    assert code == 128 + sig, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert log.count(f"interrupted by {sig.name}: nothing is written") == 1, log[-3000:]
    assert not (tmp_path / "acc.json").exists()
