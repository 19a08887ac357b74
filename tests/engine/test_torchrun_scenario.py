"""tests/engine/torchrun_scenario.py ends a run that outlives its timeout whole: torchrun and every
worker it started."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.engine.torchrun_scenario import run_scenario

HANG = Path(__file__).with_name("hang_worker.py")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_run_past_its_timeout_leaves_no_worker_behind(tmp_path):
    """Two ranks that wait for good: the run fails the test at its timeout, and no worker is left
    running. torchrun starts each worker in a session of its own, so killing torchrun's session left
    both workers running, orphaned, after the test (a hung rank of a failed test outlived it)."""
    with pytest.raises(pytest.fail.Exception, match="still running after 20 s"):
        run_scenario(HANG, tmp_path, "hang", 2, timeout=20)
    pids = [int((tmp_path / f"hang.pid{r}").read_text()) for r in range(2)]
    deadline = time.monotonic() + 10  # a SIGKILL is delivered at once; the reaping by init may lag
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:  # not left to outlive this test either
        os.kill(p, 9)
    assert not left, f"workers still running after the run was killed: {left}"
