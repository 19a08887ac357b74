"""A start-up refusal that every rank of a launch finds alike (a setting, a file each of them reads),
said once: under torchrun, N copies of one message read as N problems (engine/pretrain.py's start-up
checks, `polar serve`'s). Under torchrun rank 0 also puts its message in the launcher's store, so a
rank that met another problem (its own) still says it."""
from __future__ import annotations

import datetime
import os
import sys
import time

# How long the other ranks wait for rank 0's message before they exit: torchrun tears the job down at
# the first worker that exits, and rank 0 must have printed by then.
WAIT_S = 2.0
# How often each of the other ranks asks the launcher's store for it: they all ask the one store that
# torchrun's agent hosts (911 ranks at POLAR-7B's scale: asked every 50 ms, ~18,000 requests a second)
POLL_S = 0.25


def _key() -> str:
    # the launcher's store outlives a restart of the workers (--max-restarts)
    return f"polar/rank_stop/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _launcher_store(timeout_s: float):
    """The store torchrun's agent hosts for its workers (their process group's, before or after it
    starts), or None where there is none to reach: no torchrun (a plain process, a bare srun launch,
    whose rank 0 hosts its store only inside the process group), or an error reaching it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    try:
        import torch.distributed as dist

        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception:  # noqa: BLE001 - what it cannot reach changes only who prints, never the exit
        return None


def _said_by_rank0(store, wait_s: float):
    """Rank 0's message (str), "" where it has said none within wait_s, None where the store failed.
    Asked every POLL_S rather than waited on: a store's wait that times out writes c10d's socket warnings
    to stderr beside this rank's message."""
    deadline = time.monotonic() + wait_s
    try:
        while not store.check([_key()]):
            if time.monotonic() >= deadline:
                return ""
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        return store.get(_key()).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - what it cannot reach changes only who prints, never the exit
        return None


def stop_alike(rank: int, message: str, code: int) -> int:
    """-> code. Rank 0 prints the message. The other ranks wait up to WAIT_S before exiting (torchrun
    tears the job down at the first worker that exits, and rank 0 must have printed by then), and under
    torchrun print theirs, named by rank, where rank 0 said another message or none in that time: a rank
    that met a problem of its own (a file its node lacks) stopped silently, and the job ended with no
    word of why. Without torchrun (a bare srun launch) the other ranks stay silent: nothing tells them
    what rank 0 found."""
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
        store = _launcher_store(WAIT_S) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        if store is not None:
            try:
                store.set(_key(), message)
            except Exception:  # noqa: BLE001 - best effort: the message is printed
                pass
        return code
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    start = time.monotonic()
    store = _launcher_store(WAIT_S)
    said = _said_by_rank0(store, WAIT_S) if store is not None else None
    if said is not None and said != message:
        print(f"rank {rank}: {message}", file=sys.stderr, flush=True)
    time.sleep(max(0.0, WAIT_S - (time.monotonic() - start)))
    return code
