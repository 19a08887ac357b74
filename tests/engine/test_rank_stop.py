"""engine/rank_stop.py under torchrun: a refusal every rank finds alike is printed once, by rank 0; one a
rank meets alone, or another than rank 0's, is printed by that rank, named (it stopped silently, and the job
ended with no word of why). Both worker ranks start at once, so which reaches its refusal first varies: the
checks hold either way."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine import torchrun_scenario

WORKER = Path(__file__).with_name("rank_stop_worker.py")


def _launch(tmp_path: Path, first: str, second: str) -> str:
    log = tmp_path / "launch.log"
    proc = torchrun_scenario.start(WORKER, [first, second], 2, log)
    torchrun_scenario.wait(proc, log, 120, "stop_alike")
    assert proc.returncode != 0, log.read_text()[-3000:]
    return log.read_text()


@pytest.mark.parametrize("first, second, said", [
    ("config error: x is bad", "config error: x is bad", ["config error: x is bad"]),
    ("", "config error: rank 1's own", ["rank 1: config error: rank 1's own"]),
    ("config error: A", "config error: B", ["config error: A", "rank 1: config error: B"]),
])
def test_a_refusal_is_said_once_and_one_of_a_ranks_own_by_that_rank(tmp_path, first, second, said):
    out = _launch(tmp_path, first, second)
    for line in said:
        assert out.count(line) == 1, out[-3000:]
    assert out.count("config error:") == len(said), out[-3000:]


def test_the_other_ranks_ask_the_launchers_store_every_poll_not_every_50_ms():
    """Every rank but 0 asks the one store torchrun's agent hosts for rank 0's message (911 ranks at POLAR-7B's
    scale): asked every 50 ms, a rank made ~40 requests in WAIT_S (~18,000 a second over the job). Counted
    against a real TCPStore that rank 0's message never reaches; and one that does is still read."""
    import datetime

    import torch.distributed as dist

    from engine import rank_stop

    class Counted:
        def __init__(self, store):
            self.store, self.checks = store, 0

        def check(self, keys):
            self.checks += 1
            return self.store.check(keys)

        def get(self, key):
            return self.store.get(key)

    store = Counted(dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=30),
                                  wait_for_workers=False))
    assert rank_stop._said_by_rank0(store, rank_stop.WAIT_S) == ""
    assert store.checks <= rank_stop.WAIT_S / rank_stop.POLL_S + 2, store.checks
    store.store.set(rank_stop._key(), "config error: x is bad")
    assert rank_stop._said_by_rank0(store, rank_stop.WAIT_S) == "config error: x is bad"
