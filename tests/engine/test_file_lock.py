"""engine.file_lock: a lock held is refused to another process, and only a lock held is."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


HOLD = ("import sys, time\n"
        "from engine.file_lock import HolderLock\n"
        "HolderLock(sys.argv[1], RuntimeError('busy'))\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def test_a_take_waits_for_a_holder_that_goes_and_is_refused_by_one_that_stays(tmp_path):
    """A take with wait_s asks again until the holder lets go (a run on a lost node, whose NFS lock
    lapses with its lease) and takes the lock then, or is refused as before once wait_s has passed;
    `waiting` is called once, as the wait begins."""
    lock = str(tmp_path / ".lock")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    notes = []
    holder = subprocess.Popen([sys.executable, "-c", HOLD, lock], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RuntimeError, match="busy"):  # kept: refused after the wait
            HolderLock(lock, RuntimeError("busy"), wait_s=1.5, waiting=lambda: notes.append("kept"))
        assert notes == ["kept"] and holder.poll() is None

        def kill():
            notes.append("gone")
            holder.kill()

        HolderLock(lock, RuntimeError("busy"), wait_s=300, waiting=kill).release()
    finally:
        holder.kill()
        holder.wait()
    assert notes == ["kept", "gone"]
    mine = HolderLock(lock, RuntimeError("busy"), wait_s=300, waiting=lambda: notes.append("free"))
    mine.release()
    assert notes == ["kept", "gone"]  # a free lock is taken without a wait or a note


def test_alive_here_is_a_live_process_on_this_host_alone(tmp_path):
    """A holder alive on this host is a live run's (no NFS lease to wait out); one naming another host,
    a pid not running here, or nothing readable may be a lost node's lease."""
    import socket

    from engine.file_lock import alive_here

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".lock"
    for pid, host, alive in ((os.getpid(), socket.gethostname(), True), (os.getpid(), "lost-node", False),
                             (int(gone.stdout), socket.gethostname(), False), (1, socket.gethostname(), True)):
        lock.write_text(f"pid {pid} on {host} since 2026-12-06 01:00:00 +0000\n")
        assert alive_here(lock) is alive, (pid, host)
    lock.write_text("")
    assert not alive_here(lock) and not alive_here(tmp_path / "missing")


# a HolderLock's holder beating fast (engine.file_lock.HEARTBEAT_S, 5 s in a run), so a waiter sees it soon
BEATING = ("import sys, time\n"
           "import engine.file_lock as file_lock\n"
           "file_lock.HEARTBEAT_S = 0.2\n"
           "file_lock.HolderLock(sys.argv[1], RuntimeError('busy'))\n"
           "print('held', flush=True)\n"
           "time.sleep(600)\n")


def test_a_wait_ends_at_a_live_holders_heartbeat_and_not_at_a_stopped_ones(tmp_path):
    """A holder on another host, alive, kept a relaunch waiting the whole wait_s (180 s for a run's
    checkpoint directory) before its refusal, as if it were a lost node's NFS lock waiting for its
    lease to lapse: a HolderLock's holder now refreshes the file's mtime (its heartbeat), and a wait
    that sees it change is refused at once. A holder that stops beating (stopped here, its lock kept,
    as a lost node's is by the NFS server) is waited for as before, however fresh its last beat.
    A holder left a minute into a wait is killed: a wait that does not end lets the take in (DID NOT
    RAISE) rather than hang for wait_s."""
    import signal
    import threading

    import psutil

    from engine.file_lock import Heartbeat

    lock = str(tmp_path / ".lock")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for stopped in (False, True):
        holder = subprocess.Popen([sys.executable, "-c", BEATING, lock], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                  env=env)
        ends = []

        def take(beat=None):
            def waiting():  # the holder's end, a while into the wait
                ends.append(threading.Timer(3.0 if stopped else 60.0, holder.kill))
                ends[-1].start()
            return HolderLock(lock, RuntimeError("busy"), wait_s=600, waiting=waiting, live=beat)

        try:
            assert holder.stdout.readline() == "held\n"
            if stopped:
                holder.send_signal(signal.SIGSTOP)
                while psutil.Process(holder.pid).status() != psutil.STATUS_STOPPED:
                    time.sleep(0.01)
            beat = Heartbeat(lock)
            if stopped:  # waited for until the holder is gone, then taken
                take(beat).release()
            else:
                with pytest.raises(RuntimeError, match="busy"):
                    take(beat)
                with pytest.raises(RuntimeError, match="busy"):  # HolderLock's own watch, by default
                    take()
                assert holder.poll() is None
        finally:
            for timer in ends:
                timer.cancel()
            holder.kill()
            holder.wait()
        assert beat.seen is not stopped and len(ends) == (1 if stopped else 2)
