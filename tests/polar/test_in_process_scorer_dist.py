"""polar/in_process_scorer.py's InProcessScorer.load in a trainer's distributed workers (torch.distributed
already started by the trainer, 2 ranks over gloo): every rank loading works, each rank a replica of its own
scoring its own items; a load that rank 0 alone makes, or one beside megatron state of another layout, is
refused at once with what to do, not a wait in a collective until the process group's timeout.

tests/polar/in_process_scorer_dist_worker.py runs the three cases in turn in one launch; a rank waiting for
good is found by the timeout, which fails the tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.engine import torchrun_scenario
from tests.polar.in_process_scorer_dist_worker import ITEMS

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("in_process_scorer_dist_worker.py")
TIMEOUT = 240


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """-> (the checkpoint, each rank's result)."""
    tmp = tmp_path_factory.mktemp("in_process_dist")
    run = tmp / "run"
    subprocess.run([sys.executable, "-m", "tests.polar.serve.make_checkpoint", str(run)], cwd=ROOT, check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=600)
    log = tmp / "launch.log"
    proc = torchrun_scenario.start(WORKER, [str(run), str(tmp / "out")], 2, log)
    torchrun_scenario.wait(proc, log, TIMEOUT, "in-process scorer cases")
    return str(run), torchrun_scenario.finish(proc, log, [tmp / f"out.rank{r}" for r in range(2)])


def test_every_rank_loading_scores_as_one_process_does_and_keeps_the_trainers_generator(launched):
    """Each rank a replica (megatron's groups at tp=pp=1 over the trainer's group: data parallel), its
    rewards those of the scorer in a process of its own. The load seeded torch (megatron's model-parallel
    seeding in init_runtime): every rank's generator was reset to the same state, so the trainer's ranks
    drew the same samples after it."""
    from polar.in_process_scorer import InProcessScorer

    checkpoint, ranks = launched
    alone = InProcessScorer.load(checkpoint)
    try:
        for rank, result in enumerate(ranks):
            np.testing.assert_allclose(result["rewards"], alone.score(ITEMS[rank]), rtol=1e-5, atol=1e-6)
    finally:
        alone.close()
    assert [r["rng_kept"] for r in ranks] == [True, True]
    # the group's ranks, not RANK's: without it in the environment every rank took itself for rank 0
    assert [r["runtime_rank"] for r in ranks] == [0, 1]


@pytest.mark.parametrize("scenario", ["rank0_alone", "rank0_alone_tp1"])
def test_a_load_that_rank_0_makes_alone_is_refused_saying_what_to_do(launched, scenario):
    """It waited for rank 1 until the process group's timeout, then failed with a connection timeout saying
    nothing of the scorer: in megatron's first new_group (gloo: the scorer's 30 minutes) or, megatron's
    state already set up at tp=1, in engine.checkpoint_load.load's gather (the trainer's timeout)."""
    refusal = launched[1][0][scenario]
    assert refusal == (
        "ProcessGroupRefusal: InProcessScorer.load: loading a reward model is collective over this process's "
        "group of 2 ranks, and only 1 came within 3 s: call it on every rank of the group (each rank then holds "
        "its own replica), or give it processes of its own; `polar serve` runs in processes of its own (score "
        "through polar.reward_client)")


def test_a_load_beside_megatron_state_of_another_layout_is_refused_at_once(launched):
    """A megatron trainer at tp=2: the scorer's tp=1 cannot share megatron's state, set up once per
    process. Refused before any wait for the other ranks (rank 0 loads alone here, with 60 s to wait)."""
    assert launched[1][0]["megatron_tp2"] == (
        "ProcessGroupRefusal: InProcessScorer.load: this process already runs tp=2 pp=1 (megatron's parallel "
        "state is set up once per process); loading a reward model at tp=1 pp=1 needs a process of its own; "
        "`polar serve` runs in processes of its own (score through polar.reward_client)")
