"""engine.file_lock: a lock held is refused to another process, and only a lock held is."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.file_lock import HolderLock

ROOT = Path(__file__).resolve().parents[2]
PROBE = ("import sys\n"
         "from engine.file_lock import held\n"
         "print('probing', flush=True)\n"
         "while True:\n"
         "    held(sys.argv[1])\n")


def test_a_probe_never_makes_a_take_refused(tmp_path):
    """held() asks with a shared lock that it holds for a moment; a take meeting it (an exclusive
    lock, not waited for) was refused as if another run held the lock: a second command's
    --check-config on a run_dir made the running job's rank 0 refuse its own checkpoint directory,
    "in use by another run". Counted over 500 takes against a process that probes without a pause
    (33 of them were refused): none is now. A lock held is still refused (test_checkpoint_dir_lock)."""
    lock = str(tmp_path / ".lock")
    prober = subprocess.Popen([sys.executable, "-c", PROBE, lock], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    refused = 0
    try:
        assert prober.stdout.readline() == "probing\n"
        for _ in range(500):
            try:
                HolderLock(lock, RuntimeError("busy")).release()
            except RuntimeError:
                refused += 1
        assert prober.poll() is None  # it probed all along
    finally:
        prober.kill()
        prober.wait()
    assert refused == 0, f"{refused} of 500 takes refused by a probe"
