"""SIGTERM is a request to stop, like train.stop_file: whichever rank receives it, every rank stops
after the same step, saves it (a background write still pending is finished first) and exits with
engine.stop_signal.EXIT_SIGTERM; the resumed run gives the uninterrupted run's losses. Also: a stop file
that rank 0 cannot remove stops every rank with one error.

Runs tests/engine/stop_signal_worker.py (tests/engine/dist_worker.py's run from the parity reference's
initial weights, with SIGTERM at a chosen step) under torchrun over gloo, and engine/pretrain.py itself.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import metrics_file
from engine.setting_checks import ConfigError
from engine.stop_signal import REPEAT_ENV, REPEAT_S, SigtermFlag
from tests.engine.parity import COMMON, NO_END_SAVE, ROOT, STEPS, assert_same_run, run_worker
from tests.engine.torchrun_scenario import finish, start

WORKER = Path(__file__).with_name("stop_signal_worker.py")
EXIT_SIGTERM = 143  # engine.stop_signal.EXIT_SIGTERM, the status the README documents


def _start(tmp: Path, name: str, nproc: int, hooks: list, *overrides: str, init: str):
    """The run, started: (process, its log, each rank's result file)."""
    result = tmp / f"{name}.result"
    log = tmp / f"{name}.log"
    proc = start(WORKER, ["--result", str(result), *hooks, "--out", str(tmp / f"{name}.json"), "--no-eval",
                          "--init", init, f"run_dir={tmp / name}", *COMMON, *overrides], nproc, log)
    return proc, log, [result.with_name(f"{result.name}.rank{r}") for r in range(nproc)]


def _checkpoints(run: Path) -> list:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def one_rank_stopped(reference):
    """Rank 1 alone receives SIGTERM during step 1: (each rank's result, the log)."""
    tmp, init, _ = reference
    proc, log, results = _start(tmp, "sigterm_rank1", 2, ["--at-step", "1", "--kill-ranks", "1"], NO_END_SAVE,
                                init=init)
    return finish(proc, log, results), log.read_text()


@pytest.fixture(scope="module")
def every_process_stopped(reference, one_rank_stopped):
    """The run one_rank_stopped left, resumed (a copy of its directory) and sent SIGTERM to every process
    during step 3, step 2's background write held until then: (each rank's result, the checkpoints it
    left, as the stop left them: `resumed` then runs in the same directory). The resume is
    the one the test of one_rank_stopped needs (its steps 2 and 3 come from that checkpoint), and
    it saves the launch of a fresh run here."""
    tmp, init, _ = reference
    shutil.copytree(tmp / "sigterm_rank1", tmp / "sigterm_all")
    proc, log, results = _start(tmp, "sigterm_all", 2, ["--at-step", "3", "--wait", "--hold-save", "2"],
                                "checkpoint.resume=true", "checkpoint.async_save=true", "checkpoint.save_interval=2",
                                "checkpoint.keep=0", NO_END_SAVE, init=init)
    ready = [tmp / f"sigterm_all.result.ready{r}" for r in range(2)]
    deadline = time.monotonic() + 300
    while not all(f.exists() and f.read_text() for f in ready) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(f.exists() for f in ready), log.read_text()[-6000:]
    for f in ready:
        os.killpg(int(f.read_text()), signal.SIGTERM)  # torchrun starts each worker in a session of its own
    os.kill(proc.pid, signal.SIGTERM)
    return finish(proc, log, results), _checkpoints(tmp / "sigterm_all")


@pytest.fixture(scope="module")
def resumed(reference, every_process_stopped):
    """every_process_stopped's run resumed to the end: its history holds steps 1 (one_rank_stopped's
    run), 2-3 (every_process_stopped's, resumed from step 1) and 4 (this one's, from step 3)."""
    tmp, init, _ = reference
    run = run_worker(tmp, "sigterm_all", 2, "checkpoint.resume=true", NO_END_SAVE, init=init, evaluate=False)
    assert run["start_step"] == 1 and len(run["history"]) == STEPS, run
    return run


def test_sigterm_to_one_worker_stops_every_rank_at_the_step_it_reached_and_the_resume_matches(
        reference, one_rank_stopped, resumed):
    """Rank 1 alone receives SIGTERM during step 1: both ranks finish step 1, save it, and exit with
    status 143; the run resumed from it gives the uninterrupted run's losses. The rank died at once,
    its steps since the last checkpoint lost (here every step: nothing was saved)."""
    tmp, _, ref = reference
    ranks, log = one_rank_stopped
    for rank in ranks:
        assert rank["code"] == EXIT_SIGTERM and rank["step"] == 1, rank
        assert rank["latest"].endswith("step_00000001") and rank["partials"] == [], rank
    assert _checkpoints(tmp / "sigterm_rank1") == ["latest", "step_00000001"]
    # torchrun's failure report: each worker's own status (it signals those still up after the first exit)
    assert log.count(f"exitcode  : {EXIT_SIGTERM} ") == 2, log[-6000:]
    assert_same_run(ref, resumed, steps=range(1, 4))  # step 1 as saved, steps 2-3 trained from its checkpoint


def test_sigterm_to_every_process_finishes_the_pending_background_write_and_saves_the_step_reached(
        reference, every_process_stopped, resumed):
    """SIGTERM to every process of the job during step 3, as SLURM sends it at scancel or the time
    limit (to each worker's process group: the background writer and its results server too), while
    step 2's background write is still pending; torchrun, signalled too, sends each worker's group its
    own at once (and kills them 30 s later). Step 2's write is completed, step 3 saved and `latest`,
    every rank leaves fit with status 143, and the resume matches. Step 2 stayed
    `step_00000002.partial`, its writer killed with the workers."""
    tmp, _, ref = reference
    ranks, left = every_process_stopped
    for rank in ranks:
        assert rank["code"] == EXIT_SIGTERM and rank["step"] == 3, rank
        assert rank["latest"].endswith("step_00000003") and rank["partials"] == [], rank
    ckpts = tmp / "sigterm_all" / "checkpoints"
    # step 1 is the checkpoint this run resumed from
    assert left == ["latest", "step_00000001", "step_00000002", "step_00000003"]
    assert json.loads((ckpts / "step_00000002" / "trainer_state.json").read_text())["step"] == 2
    assert_same_run(ref, resumed)  # the saved steps' history, then step 4 trained from step 3's checkpoint


def test_a_sigterm_during_a_save_stops_at_the_step_saved_also_with_a_rank_without_the_handler(reference, tmp_path):
    """Rank 0 receives SIGTERM as step 2's periodic save begins (checkpoint.save_interval=2) while rank 1
    runs fit in a thread other than the main one, where fit cannot install its SIGTERM handler: both
    ranks stop with step 2 saved, status 143, and write no other step. Three faults fail it: the stop
    check came only in the next step, so the run trained step 3 and saved it too (the time after
    SIGTERM was the rest of a save, a step and a second save, past the step and one save that the
    grace period is said to need); the per-step stop check ran only on the rank with the handler, whose
    all-reduce waited for good for one the other never made (the test's timeout); and a rank whose fit
    runs in another thread failed to ignore further SIGTERMs (signal.signal works in the main thread
    only). A rank that ignores SIGTERM before fit (a program that handles it itself) is left without
    the handler too (engine.signal_handlers.may_handle, tests/engine/test_signal_handlers.py) and takes
    the same path through fit as this one."""
    _, init, _ = reference
    proc, log, results = _start(tmp_path, "in_save", 2, ["--kill-in-save", "2", "--kill-ranks", "0",
                                                         "--thread-ranks", "1"],
                                "checkpoint.save_interval=2", NO_END_SAVE, init=init)
    for rank in finish(proc, log, results, timeout=180):
        assert rank.get("code") == EXIT_SIGTERM and rank["step"] == 2, rank
        assert rank["latest"].endswith("step_00000002") and rank["partials"] == [], rank
    assert _checkpoints(tmp_path / "in_save") == ["latest", "step_00000002"]


def test_a_later_sigterm_ends_the_process_at_once(reference, tmp_path, monkeypatch):
    """The first SIGTERM is a stop request (the process goes on with its step), and so is one that
    follows at once (the same request delivered twice, as SLURM and torchrun do); one that comes the
    repeat window later has the default action: the process ends at once, without saving. The window
    is $POLAR_SIGTERM_REPEAT_S's here, 1 s, not the default 5 s: a handler that ignored the variable took
    the third SIGTERM, 1.1 s after the first, for the same request, and the run saved and exited 143."""
    _, init, _ = reference
    monkeypatch.setenv(REPEAT_ENV, "1")  # for the worker, started with this environment
    proc, log, _ = _start(tmp_path, "repeat", 1, ["--at-step", "2", "--kill-ranks", "0", "--repeat"], init=init)
    proc.wait(timeout=300)
    assert (tmp_path / "repeat.result.survived0").exists(), log.read_text()[-6000:]
    assert (tmp_path / "repeat.result.repeated0").exists(), log.read_text()[-6000:]
    assert proc.returncode == -signal.SIGTERM, log.read_text()[-6000:]
    assert not (tmp_path / "repeat" / "checkpoints" / "latest").exists()


def test_a_stop_file_rank_0_cannot_remove_stops_every_rank_with_one_error(reference, tmp_path):
    """Rank 0 alone removes train.stop_file once the checkpoint is saved; here it cannot: a directory
    appears at that path during step 1 (the start-up check refuses one that is there from the start;
    the tests run as root, for whom a read-only directory is no obstacle), and the stop check after
    step 1 finds it. Rank 0 raised IsADirectoryError alone while rank 1 went on as if the run had ended
    well (in engine/pretrain.py to wait in a collective for rank 0); now both raise the same ConfigError
    naming the setting, with step 1 saved."""
    _, init, _ = reference
    stop = tmp_path / "STOP"
    proc, log, results = _start(tmp_path, "stop_dir", 2, ["--at-step", "1", "--make-dir", str(stop)],
                                f"train.stop_file={stop}", NO_END_SAVE, init=init)
    ranks = finish(proc, log, results)
    assert ranks[0]["type"] == ranks[1]["type"] == "ConfigError", ranks
    assert ranks[0]["error"] == ranks[1]["error"], ranks
    assert ranks[0]["error"].startswith(f"train.stop_file={stop}: the run stopped for it at step 1 and its "
                                        f"checkpoint is complete ({tmp_path / 'stop_dir' / 'checkpoints'}"), ranks[0]
    assert "(IsADirectoryError: [Errno 21] Is a directory" in ranks[0]["error"], ranks[0]
    assert all(r["latest"].endswith("step_00000001") for r in ranks), ranks


def test_pretrain_sigterm_saves_logs_one_line_writes_the_summary_and_exits_143(tmp_path):
    """engine/pretrain.py sent SIGTERM once training runs: it saves the step it reached, says so in
    one line, writes summary.json as a stop file's stop does (stopped_by, the steps, no final
    evaluation) and exits 143 without a traceback (it died of the signal, -15, nothing saved; then
    it exited 143 with no summary.json)."""
    cmd = [sys.executable, str(ROOT / "engine" / "pretrain.py"), f"run_dir={tmp_path / 'run'}", "train.steps=1000",
           "synthetic.train_triplets=64", "synthetic.eval_triplets=16", "synthetic.prompts=50", "log.interval=1",
           "train.global_batch=2"]  # steps of 2 sequences, not 16: the stop is checked, not the step
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # "training N parameters ..." comes once fit (and its handler) has started
        lines.append(line)
        if line.startswith("training "):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    out = "".join(lines) + out
    assert proc.returncode == EXIT_SIGTERM, out[-3000:] + err[-3000:]
    stopped = re.findall(r"^stopped for SIGTERM at step (\d+): the checkpoint (\S+) is complete; exiting with "
                         r"status 143 \(the same command resumes\)$", out, re.M)
    assert len(stopped) == 1, out[-3000:]
    step, path = stopped[0]
    assert path == str(tmp_path / "run" / "checkpoints" / f"step_{int(step):08d}"), out[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"step_{int(step):08d}"
    assert "Traceback" not in err, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == int(step), summary
    assert [r["step"] for r in summary["history"]] == list(range(1, int(step) + 1)), summary["history"]
    assert summary["evaluations"] == {} and "held_out_pair_accuracy" not in summary, summary
    # nor in RUN_DIR/metrics.jsonl: a train line per step, no final line
    lines = metrics_file.read(tmp_path / "run" / metrics_file.NAME)
    assert [(r["kind"], r["step"]) for r in lines] == [("train", s) for s in range(1, int(step) + 1)], lines


@pytest.mark.parametrize("value", ["0", "-5", "abc", "5s", "nan", "inf"])
def test_a_bad_repeat_window_is_refused_naming_the_variable(monkeypatch, value):
    """$POLAR_SIGTERM_REPEAT_S is a positive number of seconds: anything else is a ConfigError naming it
    when the handler is made (Trainer's __init__, before the first step: engine/pretrain.py's `config
    error:` line and status 2 on every rank), not a window that never or always ends the process."""
    monkeypatch.setenv(REPEAT_ENV, value)
    with pytest.raises(ConfigError, match=f"^{REPEAT_ENV}='{value}': expected a positive number of seconds"):
        SigtermFlag()


@pytest.mark.parametrize("value, seconds", [("120", 120.0), (" 0.5 ", 0.5), ("", REPEAT_S)])
def test_the_repeat_window_is_read_from_the_environment(monkeypatch, value, seconds):
    """Set (spaces around it allowed) it is the window; set empty it is unset, REPEAT_S, as POLAR_NPROC."""
    monkeypatch.setenv(REPEAT_ENV, value)
    assert SigtermFlag().repeat_s == seconds
