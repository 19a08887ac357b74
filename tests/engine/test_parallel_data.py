"""Data parallelism, activation recomputation and the loss reduction against a single process
(the harness: tests/engine/parity.py): every optimizer step's loss and grad norm to fp32 rounding.
The runs of one world size train one after another in one launch (parity.run_layouts)."""
from __future__ import annotations

import pytest

from tests.engine.parity import NO_END_SAVE, assert_same_run, assert_trains_and_evaluates_alike, layouts_by_world

LAYOUTS = {
    "dp2_distributed_optimizer": (2, ["parallel.distributed_optimizer=true"]),
    # memory and speed options change memory and time only: activation recomputation (selective:
    # our shared-prefix core attention runs again in the backward; full: whole layers), and DDP's
    # overlapped gradient reduce-scatter / parameter all-gather
    "recompute_selective": (1, ["train.recompute=selective"]),
    "recompute_full": (1, ["train.recompute=full"]),
    "dp2_overlap_grad_reduce_and_param_gather": (2, ["parallel.overlap_grad_reduce=true",
                                                     "parallel.overlap_param_gather=true"]),
}
# the same global batch, split over DP ranks and micro-batches differently (trained only)
SPLITS = {
    "dp1_mb2": (1, ["train.micro_batch=2"]),  # 2 micro-batches of 2 sequences
    "dp2_mb2": (2, ["train.micro_batch=2"]),  # 1 micro-batch per rank
    "dp2_mb1_no_distopt": (2, ["parallel.distributed_optimizer=false"]),
}


@pytest.fixture(scope="module")
def runs(reference):
    """Every run of this module: one launch per world size."""
    tmp, init, _ = reference
    return layouts_by_world(tmp, "data", {**LAYOUTS, **SPLITS}, NO_END_SAVE, init=init, no_eval=tuple(SPLITS))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference, runs, name):
    assert_trains_and_evaluates_alike(reference[2], runs[name])


@pytest.mark.parametrize("name", list(SPLITS))
def test_loss_is_mean_over_global_batch(reference, runs, name):
    """Same global batch, split over DP ranks and micro-batches differently: same loss."""
    assert_same_run(reference[2], runs[name])


def test_overlap_settings_reach_megatrons_ddp(runs):
    """The overlap run's equal losses say something only if megatron overlapped: its DDP got the flags
    (and the run without them did not)."""
    from tests.engine.dist_worker import DDP_FLAGS

    flags = dict.fromkeys(DDP_FLAGS, True)
    assert runs["dp2_overlap_grad_reduce_and_param_gather"]["ddp"] == flags
    assert runs["dp2_distributed_optimizer"]["ddp"] == {**flags, "overlap_grad_reduce": False,
                                                       "overlap_param_gather": False}
