"""engine/worker_processes.py: a pool worker that calls die_with_parent works, and ends with the process
that started it, under every start method multiprocessing has here: fork (Python 3.11's default on
Linux), spawn, and forkserver (3.14's default on Linux), whose workers are children of the fork server,
not of the process that started the pool."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from engine.worker_processes import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
METHODS = multiprocessing.get_all_start_methods()

# a pool of one worker that ends with this process, its pid printed; then the process waits to be killed
_POOL = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from engine.worker_processes import die_with_parent
if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(sys.argv[1]), initializer=die_with_parent,
                               initargs=(os.getpid(),))
    print(pool.submit(os.getpid).result(60), flush=True)
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie (ended, its parent not yet told) is gone too
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("method", METHODS)
def test_a_worker_that_ends_with_its_parent_works(method):
    """Under forkserver the worker's parent is the fork server: it took that for a dead parent and
    ended at once, and the pool broke on its first task (a data build with --workers 2 failed)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        assert pool.submit(os.getpid).result(60) != os.getpid()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("method", METHODS)
def test_a_worker_ends_when_its_parent_is_killed(method):
    """SIGKILL leaves the pool no cleanup: the worker ends by itself. Under forkserver the death signal
    followed the fork server, which outlives its starter while a child of it lives (the child holds its
    pipe open), so the worker was left behind for good."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    starter = subprocess.Popen([sys.executable, "-c", _POOL, method], stdout=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        worker = int(starter.stdout.readline())
        starter.kill()
        starter.wait(30)
        deadline = time.monotonic() + 30
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker), f"{method}: worker {worker} outlived the process that started it"
    finally:
        starter.kill()
        with contextlib.suppress(ProcessLookupError):  # what a failure left behind: the worker, a fork server
            os.killpg(starter.pid, signal.SIGKILL)
