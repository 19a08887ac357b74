"""File steps of a checkpoint that rank 0 alone takes: when one fails on rank 0 only, every rank stops
with the same one-line error naming the path and the file system's error, instead of rank 0 raising
alone while the others wait for it in a collective.

Runs tests/engine/rank0_file_worker.py under torchrun over gloo (2 ranks), every scenario in turn in
one launch (module fixture); a rank left waiting is found by the timeout, which fails the tests.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine import torchrun_scenario

WORKER = Path(__file__).with_name("rank0_file_worker.py")
TIMEOUT = 240
# the save last: its trainer is the only thing a scenario leaves behind
SCENARIOS = ("latest_marker", "latest_step", "latest_undecodable", "resume_reads", "save_gathers", "save_listing")


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """-> (the launch's folder, {scenario: each rank's result})."""
    tmp = tmp_path_factory.mktemp("rank0")
    log = tmp / "launch.log"
    proc = torchrun_scenario.start(WORKER, ["--root", str(tmp), "--scenario", *SCENARIOS], 2, log)
    torchrun_scenario.wait(proc, log, TIMEOUT, "rank0 scenarios")
    return tmp, {s: torchrun_scenario.finish(proc, log, [tmp / f"{s}.rank{r}" for r in range(2)]) for s in SCENARIOS}


def _one_error(ranks: list) -> str:
    assert ranks[0]["error"] == ranks[1]["error"], ranks
    assert "\n" not in ranks[0]["error"], ranks[0]
    return ranks[0]["error"]


def test_a_save_whose_directory_rank_0_cannot_list_stops_every_rank(launch):
    """megatron lists the new `.partial` directory on rank 0 alone when a save starts (before any
    write): refused there, rank 0 raised alone and rank 1 went on into the save's collectives."""
    tmp, ranks = launch[0], launch[1]["save_listing"]
    partial = tmp / "save_listing_run" / "checkpoints" / "step_00000001.partial"
    assert _one_error(ranks) == (
        f"CheckpointWriteError: writing the checkpoint {partial} failed (PermissionError: [Errno 13] Permission "
        f"denied: '{partial}'); no complete checkpoint was written yet. Free space or make {partial.parent} "
        f"writable (or set checkpoint.dir), then run the same command again to resume")


@pytest.mark.parametrize("scenario, refused", [("latest_marker", "latest"),
                                               ("latest_step", "step_00000002/trainer_state.json")])
def test_a_resume_whose_checkpoint_rank_0_cannot_read_stops_every_rank(launch, scenario, refused):
    """A resume asks rank 0 for the newest checkpoint (the others take its answer): rank 0 refused
    the `latest` marker, or the state file of the step it names. Rank 0 raised PermissionError alone
    and rank 1 waited for its answer."""
    ranks = launch[1][scenario]
    root = launch[0] / f"{scenario}_run" / "checkpoints"
    assert _one_error(ranks) == (
        f"CheckpointError: {root}: rank 0 could not find the newest checkpoint to resume from (PermissionError: "
        f"[Errno 13] Permission denied: '{root / refused}'); make the checkpoint directory and its files "
        f"readable by the run, then run it again")


def test_a_latest_marker_that_is_not_text_resumes_from_the_newest_step_on_every_rank(launch):
    """A `latest` that does not decode names no step, as one holding another name does: the newest
    complete step is found by its name instead. Rank 0 raised UnicodeDecodeError alone."""
    ranks = launch[1]["latest_undecodable"]
    newest = str(launch[0] / "latest_undecodable_run" / "checkpoints" / "step_00000002")
    assert ranks == [{"found": newest, "error": ""}] * 2, ranks


def test_a_resume_reads_the_step_on_rank_0_alone(launch):
    """What a resume reads of the step, every rank alike (its trainer state, whose history grows with the
    run; its .metadata, which grows with the ranks that wrote it), is read by rank 0 and told to the
    others: every rank read the state file four times (the entry script's data check, the trainer's
    checks, twice in the load) and the .metadata twice (the norm dtypes' check, the LM head's), beside
    megatron's own reads. A load's check that every rank read its part takes no gather of every rank's
    answer (a payload of world-size objects on each rank)."""
    ranks = launch[1]["resume_reads"]
    assert [r["error"] for r in ranks] == ["", ""], ranks
    assert ranks[1]["found"]["opens"] == {"trainer_state.json": 0, ".metadata": 0}, ranks
    assert ranks[0]["found"]["opens"] == {"trainer_state.json": 2, ".metadata": 2}, ranks
    assert [r["found"]["all_gather_object"] for r in ranks] == [0, 0], ranks


def test_a_model_s_later_saves_keep_the_save_distribution_and_load_back(launch):
    """megatron's fully parallel save worked out which data-parallel replica writes which shard, and
    checked the whole save, at every save: two gathers of every rank's shard metadata on every rank
    (over the replicas, over the world: 912 ranks at POLAR-7B's scale), where only the first save of a
    model, or one of another structure (its weights alone), needs them. A save made with the kept
    distribution is whole: loaded into a new trainer, the next step is the saving trainer's."""
    ranks = launch[1]["save_gathers"]
    assert [r["error"] for r in ranks] == ["", ""], ranks
    for r in ranks:
        gathers = r["found"]["gathers"]
        assert gathers[0] > 0 and gathers[1] > 0 and gathers[2] == 0, ranks
        assert r["found"]["resumed_at"] == 2 and r["found"]["same"], ranks
