"""`python -m polar.serve` held between its model load and the rest of its start-up, for tests of
what a server shows the network while a large model loads (minutes for a 7B one): the real
RewardScorer.load runs, then LOADED is printed and the server waits for a line on stdin (none
with stdin at /dev/null) before it goes on: `python -m tests.polar.serve.gated_serve ARGS...`."""
import contextlib
import sys

from engine.inference import RewardScorer
from polar.serve.server import main

LOADED = "gated_serve: the model has loaded"


def _gate(load):
    def gated(*args, **kw):
        scorer = load(*args, **kw)
        print(LOADED, flush=True)
        sys.stdin.readline()
        return scorer
    return staticmethod(gated)


@contextlib.contextmanager
def gated():
    """The gate for the runs of a process that serves several (tests/engine/entry_runs.py's patch)."""
    kept = RewardScorer.__dict__["load"]  # the classmethod itself, put back as it was
    RewardScorer.load = _gate(RewardScorer.load)
    try:
        yield
    finally:
        RewardScorer.load = kept


if __name__ == "__main__":
    RewardScorer.load = _gate(RewardScorer.load)
    sys.exit(main(sys.argv[1:]))
