"""engine/evaluation.py reads and collates each batch of an evaluation on a background thread while the
model runs the batch before (as training's GlobalBatchLoader does), where it used to collate every batch
in the main thread between two: the statistics are those of an evaluation without it, at one process
and at DP2 x PP2, and of the same groups packed at another length than training's; a stop request still
stops before the same batch with the same `done`; and the thread is gone after every way out of the
evaluation (its end, a stop, an error reading a batch, an error in the stop check). On CPU the batches
are not pinned; tests/gpu/test_evaluation_gpu.py checks that on a GPU.

Runs tests/engine/eval_ahead_worker.py: in this process on the test session's runtime at one process
(an evaluation of the real engine parts, whose process is not what is checked; the weights drawn from the
run's seed as in a process of its own), under torchrun over gloo for 4 ranks at DP2 x PP2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("eval_ahead_worker.py")
ROOT = WORKER.parents[2]


def _run(tmp: Path, nproc: int, *overrides: str) -> list:
    result = tmp / "result"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           "--result", str(result), f"run_dir={tmp / 'run'}", *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(nproc)]


LAYOUTS = {"one_process": (1, []), "dp2_pp2": (4, ["parallel.pp=2"])}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    """(the layout's name, each rank's result)."""
    nproc, overrides = LAYOUTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    if nproc > 1:
        return request.param, _run(tmp, nproc, *overrides)
    from tests.engine import eval_ahead_worker

    cfg = eval_ahead_worker.config([f"run_dir={tmp / 'run'}", *overrides])
    # through JSON as the launch's ranks report it
    return request.param, [json.loads(json.dumps(eval_ahead_worker.evaluations(cfg, request.getfixturevalue(
        "runtime"))))]


def test_the_read_ahead_gives_the_same_statistics_read_off_the_main_thread(layout):
    ranks = layout[1]
    for rank in ranks:
        assert rank["ahead"] == rank["in_line"] and rank["ahead"]["pair_accuracy"] not in (0, 0.5, 1), rank
        assert rank["ahead"] == ranks[0]["ahead"]  # every rank reports the set's reduced statistics
        # each read on the read-ahead thread with it, on the main thread without it
        assert rank["ahead_threads"] == ["eval-read-ahead_0"] and rank["in_line_threads"] == ["MainThread"], rank
        assert rank["ahead_left"] == rank["in_line_left"] == [], rank
        assert rank["ahead_pinned"] == rank["in_line_pinned"] == [False], rank  # pinned on CUDA only
    from tests.engine.dist_worker import random_groups

    # the whole set's pairs, at every layout: one positive a group, against each other candidate
    assert ranks[0]["ahead"]["pairs"] == sum(len(g.candidates) - 1 for g in random_groups(7, 90, 64, 64))


def test_a_set_packed_at_another_length_than_training_evaluates_alike(layout):
    """The same groups packed at twice training's length: the same statistics (to float rounding). The
    schedule was given training's length, by which the pipeline stages size the activations they
    exchange: at PP2 the ranks' messages did not match and the launch died (SIGABRT in gloo)."""
    for rank in layout[1]:
        got, want = rank["repacked"], rank["ahead"]
        assert rank["repacked_sequences"] < rank["sequences"], rank  # another packing of the same groups
        assert got["pairs"] == want["pairs"] and got["pair_accuracy"] == want["pair_accuracy"], rank
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), rank
        assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5), rank


def test_a_stop_or_an_error_leaves_no_read_ahead_thread(layout):
    """A stop before the 3rd batch reports 2 done of the largest share's batches; an error reading the
    3rd batch's sequences (made while the 2nd ran) and one in the stop check reach the caller as they
    are; after each the read-ahead thread has been joined and the model is back in training mode."""
    for rank in layout[1]:
        share = -(-rank["sequences"] // rank["dp"])
        total = -(-share // (2 * rank["pp"]))  # EVAL_CHUNK (2 in the worker) x pp sequences a batch
        assert rank["stopped"] == ["SIGTERM", 2, total] and total > 3, rank
        error = rank["read_error"]
        assert error.startswith("ValueError: held_out.bin: sequence ") and error.endswith(" is torn"), rank
        assert rank["check_error"] == "ZeroDivisionError: division by zero", rank
        for way in ("stopped", "read_error", "check_error"):
            assert rank[f"{way}_left"] == [], (way, rank)
        assert rank["read_error_training"] and rank["check_error_training"], rank
