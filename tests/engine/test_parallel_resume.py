"""Resuming against the uninterrupted single-process run (the harness: tests/engine/parity.py), at
the same layout and from a TP2 checkpoint at TP1."""
from __future__ import annotations

from tests.engine.parity import STEPS, assert_same_run, run_worker


def test_resume_gives_the_uninterrupted_losses(reference):
    tmp, init, ref = reference
    run_worker(tmp, "resume", 1, "train.exit_at_step=2", init=init)
    resumed = run_worker(tmp, "resume", 1, "checkpoint.resume=true", init=init)
    assert_same_run(ref, resumed)  # steps 1-2 from the checkpointed history, 3-4 after resuming
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS


def test_checkpoint_saved_at_tp2_resumes_at_tp1(reference):
    tmp, init, ref = reference
    run_worker(tmp, "reshard", 2, "parallel.tp=2", "train.exit_at_step=2", init=init)
    resumed = run_worker(tmp, "reshard", 1, "checkpoint.resume=true", init=init)
    assert_same_run(ref, resumed, steps=range(3, STEPS + 1))
