"""A stop request during a periodic evaluation inside training (train.eval_interval): SIGTERM on any rank,
or train.stop_file, stops the evaluation before its next batch, the same batch on every rank; the cut
evaluation is not reported (no log line, no history row, nothing in summary.json); the step is saved and
the run exits as for a stop during a step (143 for SIGTERM, 0 and the file removed for the stop file).
The evaluation used to run to its end first: a grace period before SIGKILL had to cover a whole
evaluation plus the save.

Runs tests/engine/eval_stop_worker.py (engine/pretrain.py on its synthetic data, a tiny model; the
signal, or the file, comes from inside a chosen evaluation batch, so no timing decides the outcome) as
one process (the stop file's run, then SIGTERM's, in one launch) and under torchrun over gloo with 2 ranks.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.engine.torchrun_scenario import finish, start

WORKER = Path(__file__).with_name("eval_stop_worker.py")
EXIT_SIGTERM = 143  # engine.stop_signal.EXIT_SIGTERM, the status the README documents
# 65 packed sequences per evaluation set: 5 batches of engine.evaluation.EVAL_CHUNK=16 in one process;
# over 2 data-parallel ranks 33 and 32 of them, 3 batches and 2 (each rank still makes 3 stop checks)
RUN = ["train.steps=4", "train.eval_interval=1", "synthetic.train_triplets=64", "synthetic.eval_triplets=200",
       "synthetic.prompts=50", "log.interval=1", "log.tensorboard=false", "--eval-sequences", "65"]


def _runs(tmp: Path, nproc: int, runs: dict) -> dict:
    """{name: (each rank's result, the log, the run directory)} of `runs` ({name: worker arguments}),
    run one after another in one launch (eval_stop_worker.py --then), once it has ended; each run's
    log is its own part of the launch's."""
    args, names = [], list(runs)
    for name in names:
        args += [*(["--then"] if args else []), "--result", str(tmp / f"{name}.result"), *runs[name],
                 f"run_dir={tmp / name}", *RUN]
    log = tmp / f"{names[0]}.log"
    proc = start(WORKER, args, nproc, log)
    ranks = finish(proc, log, [tmp / f"{name}.result.rank{r}" for name in names for r in range(nproc)])
    parts = re.split(r"^== run \d+ ==$", log.read_text(), flags=re.M)
    assert len(parts) == len(names) + 1, parts[-1][-6000:]
    return {name: (ranks[i * nproc:(i + 1) * nproc], parts[i + 1], tmp / name) for i, name in enumerate(names)}


def _at(rank: dict, step: int) -> int:
    """The evaluation batches the rank ran at `step`."""
    return rank["eval_batches"].count(step)


def _evaluations(summary: dict) -> list:
    return [(r["step"], r["eval"]) for r in summary["history"] if "eval" in r]


def _only_step_saved(run: Path, step: int) -> None:
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(("step_", "latest"))) \
        == ["latest", f"step_{step:08d}"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process runs, in one process (a stop file's stop leaves it able to train again; SIGTERM's
    does not, so it comes last): `file`, train.stop_file made as the 2nd evaluation batch of the run
    begins; `one`, SIGTERM as the 17th begins: step 1 evaluates both sets (5 + 5 batches), step 2
    held_out (5), and the 2nd batch of step 2's `seen`. {name: (its result, its log, its run_dir)}."""
    tmp = tmp_path_factory.mktemp("eval_stop")
    stop = tmp / "STOP"
    return _runs(tmp, 1, {"file": ["--at-eval-batch", "2", "--touch", str(stop), f"train.stop_file={stop}"],
                          "one": ["--at-eval-batch", "17", "--kill-ranks", "0"]})


def test_a_sigterm_during_an_evaluation_stops_it_at_the_next_batch_saves_and_exits_143(one_process):
    """The evaluation of `seen` at step 2 stops after its 2nd batch of 5; held_out, evaluated whole
    before it, is reported; step 2 is saved, summary.json says SIGTERM and the process exits 143. It
    used to run `seen` to its end and report it, then save."""
    (rank,), log, run = one_process["one"]
    assert rank.get("code") == EXIT_SIGTERM and rank["step"] == 2, rank
    assert _at(rank, 2) == 5 + 2, rank
    assert "during the evaluation of seen at step 2: stopped after 2 of its 5 batches, not reported; saving and " \
           "stopping" in log, log[-6000:]
    assert not re.search(r"^eval seen at step 2", log, re.M), log[-6000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2, summary
    assert _evaluations(summary) == [(1, "held_out"), (1, "seen"), (2, "held_out")], summary["history"]
    assert summary["evaluations"] == {}, summary  # no final evaluation
    assert rank["latest"] == str(run / "checkpoints" / "step_00000002")
    _only_step_saved(run, 2)


def test_a_sigterm_to_one_rank_during_an_evaluation_stops_every_rank_at_the_same_batch(one_process, tmp_path):
    """Rank 1 alone receives SIGTERM as its 2nd batch of held_out at step 2 begins, its share's last;
    rank 0 has a 3rd. Both stop before it (rank 1 was about to run none, and still made that stop
    check with rank 0), step 2 is saved and both exit 143. Step 1's evaluations, whole, are those of
    one process. The evaluation used to run to its end on both ranks and be reported."""
    ranks, log, run = _runs(tmp_path, 2, {"two": ["--at-eval-batch", "6", "--kill-ranks", "1"]})["two"]
    for r, rank in enumerate(ranks):
        assert rank.get("code") == EXIT_SIGTERM and rank["step"] == 2, (r, rank)
        assert rank["latest"] == str(run / "checkpoints" / "step_00000002"), (r, rank)
    assert [_at(rank, 1) for rank in ranks] == [3 + 3, 2 + 2], ranks
    assert [_at(rank, 2) for rank in ranks] == [2, 2], ranks
    assert "SIGTERM received (by 1 of 2 rank(s)) during the evaluation of held_out at step 2: stopped after 2 of " \
           "its 3 batches, not reported" in log, log[-6000:]
    assert log.count(f"exitcode  : {EXIT_SIGTERM} ") == 2, log[-6000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2, summary
    assert _evaluations(summary) == [(1, "held_out"), (1, "seen")], summary["history"]
    _only_step_saved(run, 2)
    alone = json.loads((one_process["one"][2] / "summary.json").read_text())["history"]
    alone_step1 = [r for r in alone if "eval" in r and r["step"] == 1]
    assert [r["eval"] for r in alone_step1] == ["held_out", "seen"], alone
    for got, want in zip([r for r in summary["history"] if "eval" in r], alone_step1, strict=True):
        assert got["pairs"] == want["pairs"] and got["loss"] == pytest.approx(want["loss"], rel=1e-4), (got, want)


def test_a_stop_file_during_an_evaluation_stops_it_saves_and_answers_the_file(one_process):
    """train.stop_file appears during the 2nd batch of held_out at step 1 (of 5): the evaluation stops
    there, step 1 is saved, the file removed and the run ends with status 0, summary.json saying
    stop_file. It used to finish both evaluations, train step 2 (the next check) and save that."""
    (rank,), log, run = one_process["file"]
    stop = run.with_name("STOP")
    assert "code" not in rank and rank["step"] == 1, rank
    assert _at(rank, 1) == 2, rank
    assert f"train.stop_file {stop} found during the evaluation of held_out at step 1: stopped after 2 of its 5 " \
           f"batches, not reported; saving and stopping" in log, log[-6000:]
    assert not stop.exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "stop_file" and summary["steps"] == 1, summary
    assert _evaluations(summary) == [], summary["history"]
    _only_step_saved(run, 1)
