"""Data parallelism, activation recomputation and the loss reduction against a single process
(the harness: tests/engine/parity.py): every optimizer step's loss and grad norm to fp32 rounding."""
from __future__ import annotations

import pytest

from tests.engine.parity import NO_END_SAVE, assert_layout_matches, assert_same_run, run_worker

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


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference, name):
    assert_layout_matches(reference, name, *LAYOUTS[name])


@pytest.mark.parametrize(
    "name,nproc,overrides",
    [
        ("dp1_mb2", 1, ["train.micro_batch=2"]),  # 2 micro-batches of 2 sequences
        ("dp2_mb2", 2, ["train.micro_batch=2"]),  # 1 micro-batch per rank
        ("dp2_mb1_no_distopt", 2, ["parallel.distributed_optimizer=false"]),
    ],
)
def test_loss_is_mean_over_global_batch(reference, name, nproc, overrides):
    """Same global batch, split over DP ranks and micro-batches differently: same loss."""
    tmp, init, ref = reference
    assert_same_run(ref, run_worker(tmp, name, nproc, NO_END_SAVE, *overrides, init=init, evaluate=False))
