"""engine/run_lock.py's start-up check on a rank other than 0, while a lost node's lock keeps the checkpoint
directory: every rank of a job waits alike (912 at POLAR-7B's scale), and a look at the lock is an open and a
lock request on the shared file system. Rank 0 looks every second and decides; the others look seldom
(run_lock.RANK_POLL_S) and still go on once the lock is let go, before their own wait ends."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.engine.test_checkpoint_dir_lock import _LOST, ENV, ROOT

# rank 1's check, the lock's opens counted (an audit hook: os.open raises the "open" event)
_RANK1 = """
import json, os, sys, time
from engine.config import EngineConfig
from engine import run_lock
lock = os.path.join(sys.argv[1], "checkpoints", ".lock")
opens = []
sys.addaudithook(lambda event, args: opens.append(1) if event == "open" and args[0] == lock else None)
cfg = EngineConfig()
cfg.run_dir, cfg.checkpoint.lock_wait_s = sys.argv[1], float(sys.argv[2])
start = time.monotonic()
run_lock.refuse_a_held_checkpoint_dir(cfg, 1)
print(json.dumps({"opens": len(opens), "waited_s": time.monotonic() - start}))
"""


def test_a_rank_other_than_0_looks_at_a_held_lock_seldom_and_goes_on_once_it_is_free(tmp_path):
    """checkpoint.lock_wait_s=10: rank 1 waits up to 20 s (LATE_S longer than rank 0, at most twice
    as long), looking every 5 s; the holder let go 11 s after the start (rank 1's wait begins once its
    imports are done): rank 1 sees it free before its own deadline and goes on. It looked (held() and the
    heartbeat, an open each) twice a second, 30 opens in 15 s; now fewer than one a second."""
    run_dir = tmp_path / "run"
    lock = run_dir / "checkpoints" / ".lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _LOST, str(lock)], stdout=subprocess.PIPE, text=True, env=ENV,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        rank1 = subprocess.Popen([sys.executable, "-c", _RANK1, str(run_dir), "10"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        try:
            holder.wait(timeout=11)
        except subprocess.TimeoutExpired:
            holder.kill()
        out, err = rank1.communicate(timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert rank1.returncode == 0, err[-3000:]
    seen = json.loads(out)
    assert seen["waited_s"] < 20, seen  # let in before its own deadline
    assert seen["opens"] < seen["waited_s"], seen
