"""A run holds its checkpoint directory while it runs (engine/run_lock.py: a lock file, `.lock`, that
rank 0 holds): the same command started again on that run_dir (another port, another terminal, a
relaunch while the first job's ranks still train) is refused with exit code 2, naming the directory
and the process that holds it, before it reads or writes anything there. Two runs on one run_dir
both trained: the second resumed from the first's newest step and saved over its steps, and both
wrote summary.json and TensorBoard files."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.file_lock import HolderLock, held
from tests.engine import entry_runs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "engine" / "pretrain.py")
SMALL = ["train.steps=100000", "model.num_layers=1", "synthetic.train_triplets=64", "synthetic.eval_triplets=16",
         "synthetic.prompts=50", "log.interval=1", "checkpoint.save_interval=1", "checkpoint.lock_wait_s=0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
# a rank of a 2-process job as torchrun starts it (RANK and LOCAL_RANK added); no process group is reached
_RANK_ENV = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def _refusal(err: str, ckpt: Path, pid: int, host: str = socket.gethostname()) -> None:
    lines = [line for line in err.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"config error: {ckpt} is in use by another run (pid {pid} on {host} since "), lines[0]
    assert f"holding {ckpt / '.lock'}" in lines[0], lines[0]


def test_a_second_run_on_a_run_dir_in_use_is_refused_before_it_touches_it(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    first = subprocess.Popen([sys.executable, SCRIPT, f"run_dir={run_dir}", *SMALL],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    try:
        for line in first.stdout:  # a step saved: the first run holds the directory and writes into it
            if line.startswith("saved checkpoint"):
                break
        # what follows needs the directory held by a live run, not a training one: stopped, the run
        # holds its lock as before and does not train (and save, every step) through every check
        first.send_signal(signal.SIGSTOP)
        written = (run_dir / "config.yaml").stat().st_mtime_ns
        # a holder alive on this host is a live run, not a lost node's NFS lease: `check` is refused at once,
        # without the wait checkpoint.lock_wait_s gives a lease (polar pretrain's start-up check waited it out)
        waiting = [*(arg for arg in SMALL if not arg.startswith("checkpoint.lock_wait_s=")),
                   "checkpoint.lock_wait_s=30"]
        # the same command again, the start-up check, and the ranks of a 2-process job started as torchrun
        # would (every rank stops, rank 0 alone speaks; each decides alone, before any process group)
        done = entry_runs.launch(tmp_path, [
            entry_runs.run("second", "engine.pretrain", f"run_dir={run_dir}", *SMALL, cwd=tmp_path),
            entry_runs.run("check", "engine.pretrain", "--check-config", f"run_dir={run_dir}", *waiting,
                           cwd=tmp_path),
            *(entry_runs.run(f"rank{r}", "engine.pretrain", f"run_dir={run_dir}", *SMALL, cwd=tmp_path,
                             env={**_RANK_ENV, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2))],
            "in_use", timeout=300, env={"PYTHONUNBUFFERED": "1"})
        second, check = done["second"], done["check"]
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        _refusal(second.stderr, ckpt, first.pid)
        assert check.returncode == 2, check.stdout[-2000:] + check.stderr[-2000:]
        _refusal(check.stderr, ckpt, first.pid)
        assert "note: waiting" not in check.stderr, check.stderr[-3000:]
        ranks = [done[f"rank{r}"] for r in range(2)]
        outs = [(p.stdout, p.stderr) for p in ranks]
        assert [p.returncode for p in ranks] == [2, 2], outs
        _refusal(outs[0][1], ckpt, first.pid)
        assert "config error:" not in outs[1][1], outs[1]
        # refused before the run started: nothing of the first run's was read as a resume or written over
        assert all("run directory:" not in out and "resum" not in out for out in (second.stdout, outs[0][0])), outs
        assert (run_dir / "config.yaml").stat().st_mtime_ns == written
        assert not (run_dir / "summary.json").exists()
    finally:
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    assert first.returncode == 143, err[-3000:]
    # let go with the run: the lock file is gone, and the same command resumes (the check in this process:
    # it starts no process group)
    assert not (ckpt / ".lock").exists()
    from engine.pretrain import main

    monkeypatch.chdir(tmp_path)
    assert main(["--check-config", f"run_dir={run_dir}", *SMALL]) == 0, capsys.readouterr().err[-3000:]
    assert "config ok" in capsys.readouterr().out


_TAKE = """
import sys
import torch.distributed as dist
from engine.config import ConfigError
from engine.run_lock import hold_checkpoint_dir
from polar.pretrain_recipe import PretrainConfig
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
cfg = PretrainConfig()
cfg.run_dir = sys.argv[1]
cfg.checkpoint.lock_wait_s = float(sys.argv[2])
try:
    hold_checkpoint_dir(cfg, 0)
    print("taken")
except ConfigError as e:
    print(e)
finally:  # a gloo group left up at exit aborts the process now and then (-6, "terminate called ...")
    dist.destroy_process_group()
"""


def test_the_lock_taken_once_the_ranks_run_is_refused_too(tmp_path):
    """Two runs started together both find the directory free at start-up; the one whose rank 0
    takes the lock second is refused, naming the first: at once, with checkpoint.lock_wait_s, where
    the holder is alive on this host (a live run, not a lost node's lease)."""
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    lock = HolderLock(str(ckpt / ".lock"), RuntimeError("busy"))
    try:
        proc = subprocess.run([sys.executable, "-c", _TAKE, str(tmp_path / "run"), "30"], capture_output=True,
                              text=True, env=ENV, cwd=ROOT, timeout=300)
    finally:
        lock.release()
    assert proc.returncode == 0, proc.stderr[-3000:]
    _refusal(f"config error: {proc.stdout}", ckpt, os.getpid())
    assert "note: waiting" not in proc.stderr, proc.stderr[-3000:]


def test_the_lock_is_the_holders_alone_and_goes_with_it(tmp_path):
    """A process the holder forks (a checkpoint writer) does not hold the lock: one outliving a
    killed rank 0 for a moment kept it from the restarted job's new rank 0. A holder killed leaves
    the file, free; one that lets go removes it."""
    lock = tmp_path / ".lock"
    script = ("import os, sys, time\n"
              "from engine.file_lock import HolderLock\n"
              "HolderLock(sys.argv[1], RuntimeError('busy'))\n"
              "if os.fork() == 0:\n"
              "    time.sleep(600)\n"
              "    os._exit(0)\n"
              "print('held', flush=True)\n"
              "time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True,
                              env=ENV, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        assert held(str(lock))
        with pytest.raises(RuntimeError, match="busy"):
            HolderLock(str(lock), RuntimeError("busy"))
        import psutil

        child = psutil.Process(holder.pid).children()[0]
        holder.kill()
        holder.wait()
        assert child.is_running()
        assert not held(str(lock))
        child.kill()
    finally:
        holder.kill()
    assert lock.exists()
    mine = HolderLock(str(lock), RuntimeError("busy"))
    assert lock.read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
    mine.release()
    assert not lock.exists()
    again = HolderLock(str(lock), RuntimeError("busy"))
    again.release()



def _held_on(host: str, beating: bool) -> str:
    """A holder whose lock file names `host`, not this one (a holder alive on this host is refused at
    once): `beating`, a HolderLock, whose heartbeat (engine.file_lock.HEARTBEAT_S, 5 s in a run) is
    quickened; else a lock with no heartbeat, as a lost node's NFS lock is."""
    take = ("import engine.file_lock as file_lock\n"
            "file_lock.HEARTBEAT_S = 0.5\n"
            "fd = file_lock.HolderLock(sys.argv[1], RuntimeError('busy')).fd\n" if beating else
            "from engine.file_lock import claim\n"
            "fd = claim(sys.argv[1], RuntimeError('busy'))[0]\n")
    return ("import os, sys, time\n" + take + "os.ftruncate(fd, 0)\n"
            f"os.pwrite(fd, f'pid {{os.getpid()}} on {host} since 2026-12-06 01:00:00 +0000\\n'.encode(), 0)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")


# the rank 0 of a run on a node since lost, whose NFS lock the server keeps until its lease lapses
LOST_HOST = "lost-node"
_LOST = _held_on(LOST_HOST, beating=False)


def _note(err: str, lock: Path, wait: str, pid: int) -> None:
    notes = [line for line in err.splitlines() if line.startswith("note: waiting")]
    assert len(notes) == 1, err[-3000:]
    assert notes[0].startswith(f"note: waiting up to {wait} s for {lock}, held by pid {pid} on {LOST_HOST} since "), \
        notes[0]
    assert "a run on a lost node keeps its NFS lock" in notes[0], notes[0]


def test_a_restart_waits_for_the_lock_a_lost_run_keeps(tmp_path):
    """A run on a node that was lost keeps its NFS lock for the server's lease time (about 90 s)
    after its death, and its restart (torchrun --max-restarts, a SLURM requeue) was refused at once,
    "in use by another run", spending its restarts: the start-up check (every rank, --check-config)
    and rank 0's take now wait up to checkpoint.lock_wait_s, rank 0 saying so once, and go on once
    the holder is gone; one still held after the wait is refused as before, on every rank. The lost
    node's lease is played by a holder process naming another host, killed once the run says that it
    waits."""
    run_dir = tmp_path / "run"
    lock = run_dir / "checkpoints" / ".lock"
    lock.parent.mkdir(parents=True)
    small = [arg for arg in SMALL if not arg.startswith("checkpoint.lock_wait_s=")]

    def hold():
        holder = subprocess.Popen([sys.executable, "-c", _LOST, str(lock)], stdout=subprocess.PIPE, text=True,
                                  env=ENV, cwd=ROOT)
        assert holder.stdout.readline() == "held\n"
        return holder

    def freed_while_waiting(cmd: list, wait: str) -> subprocess.CompletedProcess:
        holder = hold()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
        try:
            seen = []
            for line in proc.stderr:
                seen.append(line)
                if line.startswith("note: waiting"):
                    break
            assert holder.poll() is None, "".join(seen)
            holder.kill()
            out, err = proc.communicate(timeout=300)
        finally:
            holder.kill()
            holder.wait()
            proc.kill()
        _note("".join(seen), lock, wait, holder.pid)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, "".join(seen) + err)

    holder = hold()
    try:  # held all along: refused after the wait, rank 0 alone speaking (each rank waits alone: one process)
        done = entry_runs.launch(tmp_path, [
            entry_runs.run(f"rank{r}", "engine.pretrain", f"run_dir={run_dir}", *small, "checkpoint.lock_wait_s=1",
                           cwd=tmp_path, env={**_RANK_ENV, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)],
            "held", timeout=300, env={"PYTHONUNBUFFERED": "1"})
        ranks = [done[f"rank{r}"] for r in range(2)]
        outs = [(p.stdout, p.stderr) for p in ranks]
        assert [p.returncode for p in ranks] == [2, 2], outs
        _note(outs[0][1], lock, "1", holder.pid)
        _refusal(outs[0][1], lock.parent, holder.pid, LOST_HOST)
        assert "note:" not in outs[1][1] and "config error:" not in outs[1][1], outs[1]
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    # the holder gone during the wait: the check passes, and rank 0 takes the lock
    check = freed_while_waiting([sys.executable, SCRIPT, "--check-config", f"run_dir={run_dir}", *small], "180")
    assert check.returncode == 0 and "config ok" in check.stdout, check.stdout + check.stderr[-3000:]
    take = freed_while_waiting([sys.executable, "-c", _TAKE, str(run_dir), "300"], "300")
    assert take.returncode == 0 and take.stdout == "taken\n", take.stdout + take.stderr[-3000:]


def test_a_live_run_on_another_host_is_refused_at_its_heartbeat(tmp_path, monkeypatch):
    """A relaunch while the run still trains on another host (a second sbatch on its run_dir) waited
    checkpoint.lock_wait_s (180 s) before its refusal, as a restart after a lost node waits for the
    dead rank 0's NFS lock: the holder, alive, now refreshes its lock file (its heartbeat), and the
    start-up check (rank 0 at once, another rank LATE_S later) and rank 0's take refuse once they see
    it change, saying so; a holder that does not beat is waited for as before
    (test_a_restart_waits_for_the_lock_a_lost_run_keeps). The holder is killed 90 s in: a wait that
    does not end lets the run in rather than hang for lock_wait_s=600."""
    import threading

    import engine.run_lock as run_lock
    from engine.config import ConfigError, EngineConfig

    run_dir = tmp_path / "run"
    lock = run_dir / "checkpoints" / ".lock"
    lock.parent.mkdir(parents=True)
    host = "other-node"
    holder = subprocess.Popen([sys.executable, "-c", _held_on(host, beating=True), str(lock)], stdout=subprocess.PIPE,
                              text=True, env=ENV, cwd=ROOT)
    ends = threading.Timer(90.0, holder.kill)
    try:
        assert holder.stdout.readline() == "held\n"
        ends.start()
        cfg = EngineConfig()
        cfg.run_dir, cfg.checkpoint.lock_wait_s = str(run_dir), 600.0
        monkeypatch.setattr(run_lock, "LATE_S", 1.0)
        for rank in (0, 1):
            with pytest.raises(ConfigError) as refused:
                run_lock.refuse_a_held_checkpoint_dir(cfg, rank)
            _refusal(f"config error: {refused.value}", lock.parent, holder.pid, host)
            assert "alive: its heartbeat refreshed the lock file" in str(refused.value), refused.value
        take = subprocess.run([sys.executable, "-c", _TAKE, str(run_dir), "600"], capture_output=True, text=True,
                              env=ENV, cwd=ROOT, timeout=150)
        assert take.returncode == 0, take.stderr[-3000:]
        _refusal(f"config error: {take.stdout}", lock.parent, holder.pid, host)
        assert "alive: its heartbeat refreshed the lock file" in take.stdout, take.stdout
        assert "a live one is refused once its heartbeat is seen" in take.stderr, take.stderr[-3000:]
        assert holder.poll() is None
    finally:
        ends.cancel()
        holder.kill()
        holder.wait()
