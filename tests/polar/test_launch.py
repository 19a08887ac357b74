"""polar.launch: the --nproc option of polar score / polar eval."""
from __future__ import annotations

import pytest

from polar.launch import split_nproc


def test_nproc_in_both_spellings_and_the_rest_passed_on():
    assert split_nproc(["--nproc", "4", "--tp", "2"], 1) == (4, ["--tp", "2"])
    assert split_nproc(["--tp", "2", "--nproc=3"], 1) == (3, ["--tp", "2"])
    assert split_nproc(["--tp", "2"], 1) == (1, ["--tp", "2"])


@pytest.mark.parametrize("argv,error", [(["--tp", "2", "--nproc"], "expected a number of processes after it"),
                                        (["--nproc", "two"], "expected a number of processes, got 'two'"),
                                        (["--nproc=0"], "expected at least 1")])
def test_a_bad_nproc_is_named(argv, error):
    """A trailing --nproc was passed on to the entry point, which refused it as an unknown argument."""
    with pytest.raises(SystemExit, match=error):
        split_nproc(argv, 1)


# The child of call_forwarding_signals: names the signal it received in its file, then exits 128 + it.
_CHILD = """
import os, signal, sys, time
def stop(signum, frame):
    with open(sys.argv[1], "w") as f:
        f.write(signal.Signals(signum).name)
    sys.exit(128 + signum)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(s, stop)
with open(sys.argv[1] + ".pid", "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(1)
"""

# polar's side, as in a terminal's job: the stop signals at their defaults (a background job started
# by a script has SIGINT and SIGQUIT ignored, and one started under nohup SIGHUP, which polar rightly keeps)
_PARENT = """
import signal, sys
from polar.launch import call_forwarding_signals
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGQUIT, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
sys.exit(call_forwarding_signals([sys.executable, sys.argv[1], sys.argv[2]]))
"""


def _launched(tmp_path):
    """(polar's process, the pid of the command it launched, the file the command writes the signal it
    received to), once the command runs."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    child, got = tmp_path / "child.py", tmp_path / "got"
    child.write_text(_CHILD)
    repo = Path(__file__).resolve().parents[2]
    polar = subprocess.Popen([sys.executable, "-c", _PARENT, str(child), str(got)], cwd=repo,
                             env=dict(os.environ, PYTHONPATH=str(repo)))
    pid_file = Path(f"{got}.pid")
    for _ in range(600):  # the child is started (a bounded wait, not a timing assertion)
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    return polar, int(pid_file.read_text()), got


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"])
def test_a_stop_signal_to_polar_reaches_the_launched_command(tmp_path, name):
    """torchrun runs in a process group of its own, so the terminal's signals reach polar alone: Ctrl-\\
    (SIGQUIT) ended polar and left torchrun and its workers running, orphaned."""
    import os
    import signal
    import time

    polar, pid, got = _launched(tmp_path)
    signum = getattr(signal, name)
    polar.send_signal(signum)
    try:
        code = polar.wait(timeout=60)
    finally:
        polar.kill()
    for _ in range(100):  # the child, still running where the signal did not reach it
        if got.exists():
            break
        time.sleep(0.1)
    received = got.read_text() if got.exists() else None
    if received is None:
        os.kill(pid, signal.SIGKILL)
    assert (received, code) == (name, 128 + signum)


def test_the_launched_command_ends_with_a_killed_polar(tmp_path):
    """`kill -9` of polar left torchrun (a process group of its own, which polar passes signals to)
    and its workers training, orphaned; the launched command now ends with polar."""
    import signal
    import time

    import psutil

    from polar.launch import _running

    polar, pid, _ = _launched(tmp_path)
    launched = psutil.Process(pid)
    polar.kill()
    polar.wait()
    for _ in range(300):
        if not _running(launched):
            break
        time.sleep(0.1)
    alive = _running(launched)
    if alive:
        launched.send_signal(signal.SIGKILL)
    assert not alive, "the launched command outlived polar's SIGKILL"


def test_a_stopped_launch_ends_with_its_workers_line_not_torchruns_traceback(tmp_path):
    """`polar score --nproc 2` stopped by SIGTERM: its ranks said `interrupted by SIGTERM: ...` in one line,
    and torchrun, whose agent raises SignalException out of its main once it has stopped them, followed it
    with that exception's traceback (30 lines, found walking the README); polar.torchrun ends with 143."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = ("import sys; from polar.launch import run_entry; "
            f"sys.exit(run_entry('tests.polar.launch_stop_worker', [{str(tmp_path)!r}, '--nproc', '2'], 'polar x'))")
    polar = subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1"))
    try:
        for _ in range(1200):  # both workers are up (a bounded wait, not a timing assertion)
            if all((tmp_path / f"started{r}").exists() for r in (0, 1)) or polar.poll() is not None:
                break
            time.sleep(0.1)
        polar.send_signal(signal.SIGTERM)
        out, err = polar.communicate(timeout=120)
    finally:
        if polar.poll() is None:
            polar.kill()
    assert polar.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]


# counts the signals it gets, one line each, and keeps running
_COUNTING_CHILD = """
import os, signal, sys, time
def note(signum, frame):
    with open(sys.argv[1], "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
signal.signal(signal.SIGTERM, note)
with open(sys.argv[1] + ".pid", "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(1)
"""


def _signals_passed_on(tmp_path, window: str, gap_s: float) -> list:
    """The SIGTERMs the launched command got from polar for two to polar, `gap_s` apart, with
    POLAR_SIGTERM_REPEAT_S=`window`."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    tmp_path.mkdir()
    child, got = tmp_path / "child.py", tmp_path / "got"
    child.write_text(_COUNTING_CHILD)
    repo = Path(__file__).resolve().parents[2]
    polar = subprocess.Popen([sys.executable, "-c", _PARENT, str(child), str(got)], cwd=repo,
                             env=dict(os.environ, PYTHONPATH=str(repo), POLAR_SIGTERM_REPEAT_S=window))
    pid_file = Path(f"{got}.pid")
    try:
        for _ in range(600):  # the child is started (a bounded wait, not a timing assertion)
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.1)
        polar.send_signal(signal.SIGTERM)
        for _ in range(600):  # the first is passed on
            if got.exists() and got.read_text():
                break
            time.sleep(0.1)
        time.sleep(gap_s)
        polar.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # for a second one passed on to arrive (its absence is what the first case checks)
        return got.read_text().split()
    finally:
        if pid_file.is_file() and pid_file.read_text():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        polar.kill()
        polar.wait()


def test_polar_passes_on_a_repeated_signal_by_the_workers_repeat_window(tmp_path):
    """POLAR_SIGTERM_REPEAT_S is the workers' window (engine.stop_signal) and polar's: a second SIGTERM within it
    is the same request, not passed on; one after it is passed on, as the workers then act on it. polar
    kept a window of its own (5 s): with the workers' set shorter, a second SIGTERM they would act on
    never reached them."""
    assert _signals_passed_on(tmp_path / "within", "600", 0.0) == ["SIGTERM"]
    assert _signals_passed_on(tmp_path / "after", "0.5", 1.0) == ["SIGTERM", "SIGTERM"]


def test_a_bad_repeat_window_is_refused_before_the_command_starts(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    child, got = tmp_path / "child.py", tmp_path / "got"
    child.write_text(_COUNTING_CHILD)
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", _PARENT, str(child), str(got)], cwd=repo, capture_output=True,
                         text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(repo), POLAR_SIGTERM_REPEAT_S="5s"))
    assert run.returncode == 2 and not Path(f"{got}.pid").exists(), (run.returncode, run.stderr)
    assert run.stderr.splitlines() == [run.stderr.splitlines()[0]], run.stderr
    assert run.stderr.startswith("polar: POLAR_SIGTERM_REPEAT_S='5s': expected a positive number of seconds"), run.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_child_killed_by_a_signal_polar_did_not_get_ends_it_with_128_plus_the_signal(capsys, sig):
    """A launched process killed by a signal that never reached polar (the OOM killer's SIGKILL, a kill of
    the start-up check's pid): polar's exit status is a shell's 128 + the signal, and it says which. The
    child's -15 was returned as it was, and sys.exit(-15) ended polar with 241, nothing said."""
    import signal
    import sys

    from polar.launch import call_forwarding_signals

    code = call_forwarding_signals([sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{sig})"])
    assert code == 128 + signal.Signals[sig].value, code
    assert capsys.readouterr().err == f"polar: {sys.executable.rsplit('/', 1)[-1]} -c import os, signal; os.kill(" \
        f"os.getpid(), signal.{sig}) was killed by {sig}\n"
