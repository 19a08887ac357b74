"""engine.rank_stop.stop_alike under torchrun (2 ranks), each rank stopping with the message argv gives it:
`python rank_stop_worker.py MESSAGE_OF_RANK_0 MESSAGE_OF_RANK_1`. An empty message: that rank found nothing
and goes on (waits, as a rank would in init_process_group for the one that stopped) until torchrun ends it."""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from engine.rank_stop import stop_alike  # noqa: E402

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    message = sys.argv[1 + rank]
    if not message:
        time.sleep(60)
        sys.exit(0)
    sys.exit(stop_alike(rank, message, 2))
