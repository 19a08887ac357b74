"""benchmarks/pretrain_runs.py: a run cut at its time limit is killed with every process under it
(torchrun's workers outlive a killed torchrun and would hold the GPU through the next runs), and
the call returns at its limit, not when an orphaned child closes the output pipe."""
import sys
import textwrap

import psutil

from benchmarks.pretrain_runs import run_logged

# a parent that starts a child, writes the child's pid, and waits on it: a launcher and its worker
LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[1], "w").write(str(child.pid))
    child.wait()
""")


def test_a_run_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    rc, tail, wall = run_logged([sys.executable, "-c", LAUNCHER, str(pid_file)], timeout=10)
    assert rc == 124 and tail == "timed out"
    # the child held the output pipe: reading it to its end waited for the child's whole sleep
    assert wall < 60, wall
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_finished_run_returns_its_exit_code_and_output():
    rc, tail, _ = run_logged([sys.executable, "-c", "import sys; print('x' * 3000); sys.exit(3)"], timeout=60)
    assert rc == 3 and tail == ("x" * 3000 + "\n")[-2000:]
