"""tests/engine/dist_worker.py's training run with every checkpoint of it saved twice, of the same state at
the same point: synchronously into the directory given by $POLAR_SYNC_COPY, then as the run's settings say
(checkpoint.async_save=true: in the background) into its own checkpoints/. The two are compared file by
file, in one process, so no difference between two GPU runs (atomics' order) enters the comparison.

    python tests/gpu/save_twice_worker.py --out OUT.json run_dir=RUN checkpoint.async_save=true ...
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from engine.trainer import Trainer  # noqa: E402
from tests.engine import dist_worker  # noqa: E402

_save = Trainer.save


def save_twice(self) -> str:
    background, ckpt_dir = self.saves, self.ckpt_dir
    self.saves, self.ckpt_dir = None, os.environ["POLAR_SYNC_COPY"]  # no background saves: a synchronous one
    try:
        _save(self)
    finally:
        self.saves, self.ckpt_dir = background, ckpt_dir
    return _save(self)


if __name__ == "__main__":
    Trainer.save = save_twice
    dist_worker.main()
