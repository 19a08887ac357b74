"""An evaluation inside training (the periodic one, train.eval_interval, and engine/pretrain.py's final
`evaluating ...`) prints its progress on the main rank, with rate and ETA, at most every
engine.evaluation.PROGRESS_S seconds and not within the first: at scale one takes minutes, and nothing
was printed between its start and its result. A short one prints nothing more than before.

engine.progress.RateLine is checked against a clock the test moves; the runs (engine/pretrain.py on its
synthetic data, a tiny model, tests/engine/eval_progress_worker.py) set PROGRESS_S to 0, a line per
batch, as one process and as two data-parallel ranks under torchrun over gloo.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.progress import RateLine
from tests.engine.torchrun_scenario import start, wait

WORKER = Path(__file__).with_name("eval_progress_worker.py")
RUN = ["train.steps=2", "train.eval_interval=1", "synthetic.train_triplets=64", "synthetic.eval_triplets=100",
       "synthetic.prompts=50", "log.interval=1", "log.tensorboard=false"]
LINE = re.compile(r"^evaluating (\w+): ([\d,]+)/([\d,]+) packed sequences \| ([\d.,e+-]+) seq/s \| eta (\d+m\d\ds)$",
                  re.M)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _line(interval: float = 5.0, total: int = 12_800):
    clock, said = Clock(), []
    return RateLine("evaluating held_out", total, "packed sequences", "seq/s", said.append, interval, clock), \
        clock, said


def test_a_line_at_most_every_interval_with_rate_and_eta():
    line, clock, said = _line()
    for done, at in ((320, 101.0), (640, 104.9), (1280, 105.0), (1600, 106.0), (3200, 110.0), (3520, 114.0)):
        clock.now = at
        line.update(done)
    # 1,280 in 5 s: 256/s, 11,520 left: 45 s; 3,200 in 10 s: 320/s, 9,600 left: 30 s
    assert said == ["evaluating held_out: 1,280/12,800 packed sequences | 256 seq/s | eta 0m45s",
                    "evaluating held_out: 3,200/12,800 packed sequences | 320 seq/s | eta 0m30s"]


def test_a_loop_that_ends_within_the_interval_prints_nothing():
    line, clock, said = _line(total=64)
    for i in range(1, 5):
        clock.now += 1.0
        line.update(16 * i)
    assert said == []


def test_a_slow_rate_and_a_long_eta_read_as_such():
    line, clock, said = _line(interval=0.0, total=100)
    clock.now += 40.0
    line.update(1)
    clock.now += 4000.0
    line.update(0)  # nothing done yet, by the counts given: no ETA
    assert said == ["evaluating held_out: 1/100 packed sequences | 0.025 seq/s | eta 1h06m00s",
                    "evaluating held_out: 0/100 packed sequences | 0 seq/s"]


def _progress(log: str) -> dict:
    """{set name: [(done, total), ...] in order} of the progress lines; each line's rate and ETA read."""
    found: dict = {}
    for name, done, total, rate, _ in LINE.findall(log):
        assert float(rate.replace(",", "")) > 0
        found.setdefault(name, []).append((int(done.replace(",", "")), int(total.replace(",", ""))))
    return found


def _expected(total: int, per_batch: int, evaluations: int) -> list:
    counts = [min(total, n) for n in range(per_batch, total + per_batch, per_batch)]
    return [(n, total) for n in counts] * evaluations


@pytest.mark.parametrize("nproc", [1, 2])
def test_every_evaluation_of_a_run_prints_its_progress(tmp_path, nproc):
    """Step 1's periodic evaluation and the final one, of held_out and seen: at PROGRESS_S=0 one line per
    batch (16 packed sequences per data-parallel rank), counting the whole set, printed by rank 0 alone;
    the last line of each evaluation is the set's size. Nothing of it was printed."""
    log, run = tmp_path / "run.log", tmp_path / "run"
    proc = start(WORKER, ["--every", "0", f"run_dir={run}", *RUN], nproc, log)
    wait(proc, log, 600)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]  # every rank ended whole, not one dying after the summary
    summary = json.loads((run / "summary.json").read_text())
    assert [r["eval"] for r in summary["history"] if "eval" in r] == ["held_out", "seen"], summary["history"]
    found = _progress(text)
    assert sorted(found) == ["held_out", "seen"], text[-4000:]
    for name, lines in found.items():
        total = lines[-1][1]
        assert total > 16 * nproc, (name, total)  # several batches, the last one short or not
        assert lines == _expected(total, 16 * nproc, 2), (name, lines)

