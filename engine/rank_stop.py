"""A start-up refusal that every rank of a launch finds alike (a setting, a file each of them reads),
said once: under torchrun, N copies of one message read as N problems (engine/pretrain.py's start-up
checks, `polar serve`'s)."""
from __future__ import annotations

import os
import sys
import time


def stop_alike(rank: int, message: str, code: int) -> int:
    """-> code. Rank 0 prints the one message. The other ranks, which found the same problem, wait a moment
    before exiting: torchrun tears the job down at the first worker that exits, and rank 0 must have printed
    by then. Only for what every rank finds alike: an error one rank may meet alone (its own shard, CUDA out
    of memory) is said by that rank, since rank 0 may have found nothing."""
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(2.0)
    return code
