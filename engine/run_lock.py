"""One run per checkpoint directory: the lock a run's rank 0 holds on `<checkpoint dir>/.lock` for the
run's life, and the start-up check that refuses a second run on a directory another run holds (the same
command started twice, a relaunch while the first job's ranks still train), waiting for the NFS lock a
lost node keeps until its lease lapses but not for a holder alive here or heartbeating elsewhere."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from engine.config import ConfigError

LOCK_FILE = ".lock"  # in the checkpoint directory: held by the run's rank 0 while it runs (HolderLock)


def _held_by_another_run(ckpt_dir: str, lock: str, beating: bool = False) -> ConfigError:
    """`beating`: the holder's heartbeat was seen (engine.file_lock.Heartbeat), alive on its host."""
    from engine.file_lock import holder

    alive = ", alive: its heartbeat refreshed the lock file while this run waited" if beating else ""
    return ConfigError(f"{ckpt_dir} is in use by another run ({holder(lock)}, holding {lock}{alive}): two runs on "
                       "one checkpoint directory resume from and save over each other's steps; wait for that run "
                       "to end or stop it, or give this one a run_dir (or checkpoint.dir) of its own")


# A rank other than 0 waits this much longer for the lock than rank 0 (up to checkpoint.lock_wait_s
# more), and refuses this long after it sees the holder's heartbeat, where rank 0 refuses at once: ranks
# reach the check up to some seconds apart (imports from a shared file system), and torchrun ends the job
# at the first rank that exits. Rank 0, the one that names the holder, decides: refused, it has printed
# why before the others' wait ends; let in, the others find the lock free too.
LATE_S = 30.0
# ... and looks at the lock (and at its heartbeat) at most this often, where rank 0 looks every
# engine.file_lock.POLL_S: every rank of a job waits alike, and each look is an open and a lock request
# (or an open and a stat) on the shared file system, 912 a second at POLAR-7B's scale for the whole wait
# (checkpoint.lock_wait_s, 180 s by default, after a lost node). Rank 0's looks decide; the others only
# keep off the directory until then, and see it free within this (at most half their extra wait, so
# that one looks after rank 0's deadline and before their own).
RANK_POLL_S = 10.0


def _seldom(look, every_s: float):
    """look(), asked at most every `every_s` seconds (the first time at once); its last answer between."""
    last: list = []

    def asked():
        now = time.monotonic()
        if not last or now - last[1] >= every_s:
            last[:] = [look(), now]
        return last[0]
    return asked


def _waiting_note(lock: str, wait_s: float):
    from engine.file_lock import HEARTBEAT_S, holder

    def note():
        print(f"note: waiting up to {wait_s:g} s for {lock}, held by {holder(lock)}: a run on a lost node keeps "
              "its NFS lock for the server's lease time after its death; a live one is refused once its heartbeat "
              f"is seen, within {2 * HEARTBEAT_S:g} s (checkpoint.lock_wait_s=0 refuses at once)",
              file=sys.stderr, flush=True)
    return note


def refuse_a_held_checkpoint_dir(cfg, rank: int = 0) -> None:
    """A run whose checkpoint directory another run holds (the same command started twice, a
    relaunch while the first job's ranks still train) is refused on every rank, with --check-config
    too, before anything of the directory is read: a second run resumed from the first's newest step
    and saved over its steps, and wrote its summary.json and TensorBoard files beside the first's.
    Refused once the lock is still held after checkpoint.lock_wait_s (rank 0 says at once that it
    waits): a restart after a lost node finds the dead rank 0's NFS lock until its lease lapses.
    A holder alive on rank 0's host is a live run, refused at once (no lease lapses for it: the same
    command started twice on one machine waited checkpoint.lock_wait_s for nothing); one alive on
    another host, once its heartbeat is seen during the wait (its HolderLock refreshes the lock file
    every HEARTBEAT_S; a lost node's lease does not), within about two beats. Asking takes nothing:
    rank 0 takes the lock once the ranks have started (hold_checkpoint_dir)."""
    from engine.checkpoint import run_checkpoint_dir
    from engine.file_lock import Heartbeat, alive_here, held, waited

    ckpt_dir = run_checkpoint_dir(cfg)
    lock = str(Path(ckpt_dir) / LOCK_FILE)
    wait_s = cfg.checkpoint.lock_wait_s
    if rank == 0 and held(lock) and alive_here(lock):
        raise _held_by_another_run(ckpt_dir, lock)
    late = min(wait_s, LATE_S) if rank else 0.0
    beat = Heartbeat(lock)
    every_s = min(RANK_POLL_S, late / 2)  # 0 on rank 0: every look of waited's
    busy, beating = _seldom(lambda: held(lock), every_s), _seldom(beat, every_s)
    if waited(busy, wait_s + late, _waiting_note(lock, wait_s) if rank == 0 else None,
              lambda: beating() and time.monotonic() - beat.seen_at >= late):
        raise _held_by_another_run(ckpt_dir, lock, beat.seen)


def hold_checkpoint_dir(cfg, rank: int):
    """The lock on the run's checkpoint directory (created), taken by rank 0 for the run (a
    HolderLock: the kernel lets go of it when the process dies, so a restarted job's new ranks find
    it free, and its heartbeat tells a run waiting on another host that this one is alive); None on
    the other ranks. Another run holding it still after checkpoint.lock_wait_s, or whose heartbeat
    is seen meanwhile, stops every rank with a config error naming that run's process (the wait at
    most half of parallel.timeout_minutes: the other ranks wait for rank 0's answer in a collective).
    Call once every rank has passed refuse_a_held_checkpoint_dir: before, a rank asking would find
    its own rank 0 holding it."""
    from engine.checkpoint import on_rank0, run_checkpoint_dir
    from engine.file_lock import Heartbeat, HolderLock, alive_here

    ckpt_dir = run_checkpoint_dir(cfg)
    lock = str(Path(ckpt_dir) / LOCK_FILE)
    taken = []  # rank 0's alone: what on_rank0 returns is sent to every rank

    def take():
        # a holder alive on this host is a live run, refused at once (refuse_a_held_checkpoint_dir)
        wait_s = 0.0 if alive_here(lock) else min(cfg.checkpoint.lock_wait_s, cfg.parallel.timeout_minutes * 30.0)
        beat = Heartbeat(lock)
        taken.append(HolderLock(lock, lambda: _held_by_another_run(ckpt_dir, lock, beat.seen),  # named when refused
                                wait_s, _waiting_note(lock, wait_s), beat))

    error = on_rank0(rank, take)
    if error:
        raise ConfigError(error)
    if taken and taken[0].unlocked:
        print(f"note: {lock}: cannot lock ({taken[0].unlocked}); do not start a second run on {ckpt_dir} while "
              "this one runs", file=sys.stderr, flush=True)
    return taken[0] if taken else None
