"""checkpoint.async_save=true: a save is copied to host memory and written by a forked process while
training goes on, and becomes `latest` only once every rank's write has finished.

Runs under torchrun over gloo (2 ranks), as tests/engine/test_parallel_resume.py does: whole trainings
through tests/engine/dist_worker.py, and the points a whole run does not reach on its own (a writer
held back while the weights change, a writer that cannot write, a kill while one is pending) through
tests/engine/async_save_worker.py, most of them as the cases of one scenario (CASES). Starting the
ranks is most of a run's time: the runs share two launches (tests/engine/runs_worker.py), every
layout's synchronous and background runs with CASES after them, then the resumes from the background
saves with the run that ends its launch (a step failing on one rank); only the kill has a process of
its own.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint_async
from tests.engine import runs_worker
from tests.engine.parity import NO_END_SAVE, STEPS, assert_same_run
from tests.engine.torchrun_scenario import run_scenario

WORKER = Path(__file__).with_name("async_save_worker.py")
_run_scenario = functools.partial(run_scenario, WORKER)
ASYNC = "checkpoint.async_save=true"
SAVES = ["checkpoint.save_interval=2", "checkpoint.keep=0"]  # steps 2 and 4 of the 4, both kept
LAYOUTS = {"dp2": [], "tp2": ["parallel.tp=2"]}


def _loaded(step: Path, tmp: Path) -> dict:
    """Every tensor and object of a step's files, read back whole (any layout's shards joined)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step.parent.parent.name}_{step.name}.pt"
    dcp_to_torch_save(str(step), str(out))
    return torch.load(out, weights_only=False)


TIMINGS = ("tokens_per_s", "triplets_per_s", "step_time_s", "tflops_per_s")


def _untimed(step: Path) -> dict:
    """A step's trainer state without the throughput its history logged, the job that wrote it
    (torchrun's rendezvous id) and the save's id, which differ from run to run."""
    state = json.loads((step / "trainer_state.json").read_text())
    del state["job"], state["save_id"]
    state["history"] = [{k: v for k, v in row.items() if k not in TIMINGS} for row in state["history"]]
    assert len(state["history"]) == state["step"]
    return state


def _rolled_back(run: Path, step: str, copy: Path) -> None:
    """A copy of `run` whose newest checkpoint is `step` (what a run stopped there leaves)."""
    shutil.copytree(run, copy)
    for later in (copy / "checkpoints").glob("step_*"):
        if later.name > step:
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text(step)


def _run_pairs(reference, layouts: dict) -> list:
    """The same run (from the reference's initial weights, saving at steps 2 and 4) saved
    synchronously and in the background, at each layout: the runs of a launch
    (tests/engine/runs_worker.py), `{mode}_{layout}`."""
    tmp, init, _ = reference
    return [runs_worker.run(tmp, f"{mode}_{layout}", *overrides, *SAVES, *extra, init=init, evaluate=False)
            for layout, overrides in sorted(layouts.items()) for mode, extra in (("sync", []), ("async", [ASYNC]))]


def _resumes(reference, layouts: dict) -> list:
    """At each layout, a run resumed from a copy of the background run rolled back to its step-2
    save (`async_{layout}_at2`): the runs of a launch."""
    tmp, init, _ = reference
    for layout in layouts:
        _rolled_back(tmp / f"async_{layout}", "step_00000002", tmp / f"async_{layout}_at2")
    return [runs_worker.run(tmp, f"async_{layout}_at2", *overrides, "checkpoint.resume=true", NO_END_SAVE,
                            init=init, evaluate=False) for layout, overrides in sorted(layouts.items())]


def _label(kind: str, layouts: dict) -> str:
    return f"{kind}_{'_'.join(sorted(layouts))}"


def layout_fixtures(layouts: dict, first=(), then=()):
    """The module fixtures of the comparisons below at `layouts` (tests/engine/test_checkpoint_async_layouts.py
    has the pipeline layouts): `launched` runs every layout's pair in one torchrun launch (with the
    runs `first(tmp)` gives after them), `sync_and_async` is one layout's pair, (tmp, init, layout,
    its settings, sync result, async result), and `resumed` the resume of each layout's background
    save, all in a second launch (with the runs `then(tmp)` gives after them) -> {layout: result}."""

    @pytest.fixture(scope="module")
    def launched(reference):
        tmp = reference[0]
        log = runs_worker.launch(tmp, _label("pairs", layouts), 2,
                                 _run_pairs(reference, layouts) + [run for f in first for run in f(tmp)])
        return {layout: (*reference[:2], layout, overrides, *(runs_worker.result(tmp, f"{mode}_{layout}", log=log)
                                                              for mode in ("sync", "async")))
                for layout, overrides in layouts.items()}

    @pytest.fixture(scope="module", params=sorted(layouts))
    def sync_and_async(request, launched):
        return launched[request.param]

    @pytest.fixture(scope="module")
    def resumed(reference, launched):
        tmp = reference[0]
        # a run of `then` may end the launch (its exit status is its test's)
        log = runs_worker.launch(tmp, _label("resumes", layouts), 2,
                                 _resumes(reference, layouts) + [run for f in then for run in f(tmp)],
                                 status=None if then else 0)
        return {layout: runs_worker.result(tmp, f"async_{layout}_at2", log=log) for layout in layouts}

    return launched, sync_and_async, resumed


def test_a_background_save_writes_what_a_synchronous_one_writes(sync_and_async):
    """Every tensor (weights, Adam moments, fp32 main weights, across the ranks' shards), the common
    state, the trainer state and the model settings of steps 2 and 4 read back the same, and the
    training they were taken from is the same: the background writer takes nothing from the trainer."""
    tmp, _, layout, overrides, sync, background = sync_and_async
    assert_same_run(sync, background)
    # the layout megatron's groups gave the run (one launch runs several: tests/engine/runs_worker.py)
    ran_at = {"tp": 1, "pp": 1, "vpp": None, **{o.split("=")[0][len("parallel."):]: int(o.split("=")[1])
                                                for o in overrides}}
    ran_at["dp"] = 2 // (ran_at["tp"] * ran_at["pp"])
    for step in ("step_00000002", "step_00000004"):
        a, b = (tmp / f"{mode}_{layout}" / "checkpoints" / step for mode in ("sync", "async"))
        assert _untimed(b)["layout"] == ran_at, step
        for name in ("model.json", "metadata.json"):
            assert (a / name).read_text() == (b / name).read_text(), f"{step}/{name}"
        assert _untimed(a) == _untimed(b), step
        want, got = _loaded(a, tmp), _loaded(b, tmp)
        assert sorted(want) == sorted(got) and any(k.startswith("optimizer.") for k in want), sorted(want)[:20]
        for key, value in want.items():
            same = torch.equal(value, got[key]) if isinstance(value, torch.Tensor) else value == got[key]
            assert same, f"{step}: {key}"


def test_a_background_save_resumes_as_the_uninterrupted_run_goes_on(sync_and_async, resumed):
    """A run resumed from the background save at step 2 trains steps 3-4 as the uninterrupted run
    did (the synchronous one, within the parity tolerance), and carries steps 1-2 of its history over
    from the save. At pp2 and pp2_vpp2 (test_checkpoint_async_layouts.py) this is the CPU suite's only
    resume of a pipeline-parallel checkpoint: keep it."""
    _, _, layout, _, sync, _ = sync_and_async
    got = resumed[layout]
    assert got["start_step"] == 1 and len(got["history"]) == STEPS, got["history"]
    assert_same_run(sync, got)


def test_the_end_of_the_run_waits_for_the_pending_save(sync_and_async):
    """The step-4 save (checkpoint.save_interval, the run's last step) is pending when the loop ends:
    the process exits only once it is complete and named `latest`, nothing left `.partial`."""
    tmp, _, layout, _, _, _ = sync_and_async
    ckpts = tmp / f"async_{layout}" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert json.loads((ckpts / "step_00000004" / "trainer_state.json").read_text())["step"] == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002", "step_00000004"]


# The 2-rank scenarios whose process lives on after them, run as the cases of one scenario (each with a
# trainer and a run directory of its own; starting the ranks is most of a scenario's time):
# [name, scenario, its options, its settings]
SNAPSHOT = {"not_distributed": "parallel.distributed_optimizer=false",
            "dp_reshardable": "checkpoint.optimizer_format=dp_reshardable"}
RANK0_FILES = {"index": ".metadata", "config": "metadata.json"}
MODES = {mode: f"checkpoint.async_save={str(mode == 'async').lower()}" for mode in ("sync", "async")}
CASES = [[f"rank0_file_{mode}_{key}", "rank0_file", {"file": file}, [MODES[mode]]]
         for mode in MODES for key, file in RANK0_FILES.items()]
CASES += [[f"snapshot_{key}", "snapshot", {}, [setting]] for key, setting in SNAPSHOT.items()]
# twice: each stop with a save pending agrees over the job's store, under keys of its own
STEP_FAILS = ("step_fails", "step_fails_again")
CASES += [[name, "step_fails", {}, ["checkpoint.save_interval=1"]] for name in STEP_FAILS]
CASES += [[f"failing_{mode}", "failing", {}, ["checkpoint.save_interval=1", MODES[mode]]] for mode in MODES]


# how long the rank that stops waits for the other (engine.checkpoint_async.AGREE_S, 20 s): rank 0,
# waiting in a collective for it, never comes, whatever the wait
AGREE_S = 3


def _cases_run(tmp: Path) -> list:
    """The scenario of CASES, in the launch of the sync and async runs of LAYOUTS, after them."""
    (tmp / "async_cases").mkdir()
    return [runs_worker.scenario(tmp / "async_cases", "cases", "cases", args=["--cases", json.dumps(CASES)])]


def _one_fails_run(tmp: Path) -> list:
    """step_fails on rank 1 alone, which ends the launch (the last of the resumes')."""
    (tmp / "async_one_fails").mkdir()
    return [runs_worker.scenario(tmp / "async_one_fails", "one_fails", "step_fails", "checkpoint.save_interval=1",
                                 args=["--failing", "1", "--agree-s", str(AGREE_S)])]


launched, sync_and_async, resumed = layout_fixtures(LAYOUTS, first=[_cases_run], then=[_one_fails_run])


@pytest.fixture(scope="module")
def cases(reference, launched):
    """The CASES scenario's results: a function of a case's name -> (its checkpoint directory, each rank's
    result)."""
    tmp = reference[0] / "async_cases"
    ranks = runs_worker.result(tmp, "cases", (0, 1), log=reference[0] / f"{_label('pairs', LAYOUTS)}.log")
    return lambda name: (tmp / "cases_run" / name / "checkpoints", [rank[name] for rank in ranks])


@pytest.mark.parametrize("optimizer", sorted(SNAPSHOT))
def test_values_changed_after_a_background_save_returns_are_not_in_it(cases, optimizer):
    """The trainer adds 1 to every weight, main weight and Adam moment in place right after save()
    returns, while the writer is held back: the checkpoint holds the values of the save. megatron
    copies only CPU tensors that are views (these optimizers' moments are not, nor at DP2 most
    weights): written from the live memory by a writer thread, 52 of 60 tensors came back changed
    (distributed_optimizer=false) and 18 of 42 on rank 0 (dp_reshardable); the forked writer reads the memory
    as it was at the fork."""
    _, ranks = cases(f"snapshot_{optimizer}")
    for rank in ranks:
        assert rank["pending_after_save"] and rank["complete"] and rank["tensors"] > 0, rank
        assert rank["changed"] == 0, rank


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_write_that_fails_is_an_error_naming_the_directory_and_the_step_kept(cases, mode):
    """The step-2 save cannot write (its files limited to 1 KiB: the kernel refuses the write as it
    would on a full disk), in its background writer or, saved synchronously, in the trainer: every
    rank raises CheckpointWriteError (in the background at the next finalize check), rank 0 with the
    file system's error, and the complete step 1 stays `latest`. A synchronous save raised megatron's
    CheckpointException, a BaseException whose text is "error: <class 'OSError'>": a traceback from
    every rank."""
    ckpts, ranks = cases(f"failing_{mode}")
    for rank in ranks:
        # found at the log step after it or by the step-3 save, which first finishes the one pending
        assert rank["saves"] in ([[1, 2], [1, 2, 3]] if mode == "async" else [[1, 2]]), rank
        assert rank["latest"] == str(ckpts / "step_00000001"), rank
        assert rank["partials"] == ["step_00000002.partial"], rank
        assert rank["error"].startswith(f"writing the checkpoint {ckpts / 'step_00000002.partial'} failed ("), rank
        assert f"newest: {ckpts / 'step_00000001'}" in rank["error"], rank
        assert rank["notes"] == [], rank  # the failed save is no longer pending when the run stops
    assert ranks[0]["error"].startswith(
        f"writing the checkpoint {ckpts / 'step_00000002.partial'} failed (OSError: [Errno 27] File too large); the "
        f"complete checkpoints are kept (newest: {ckpts / 'step_00000001'})"), ranks[0]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(RANK0_FILES))
def test_a_file_only_rank_0_writes_that_fails_stops_every_rank_with_one_error(cases, mode, name):
    """megatron's finalize writes the shards' index (.metadata) and metadata.json on rank 0 alone, each
    followed by a collective. Here a directory stands in the way of one of them on rank 0 only (in
    both save modes): rank 0 raised before the collective and rank 1 waited in it for good (this test
    was killed at its timeout). Now every rank raises the same CheckpointWriteError naming the file
    system's error, the step stays `.partial` and the complete step 1 stays `latest`."""
    ckpts, ranks = cases(f"rank0_file_{mode}_{name}")
    assert ranks[0]["error"] == ranks[1]["error"], ranks
    assert ranks[0]["error"].startswith(f"writing the checkpoint {ckpts / 'step_00000002.partial'} failed "
                                        f"(IsADirectoryError: [Errno 21] Is a directory"), ranks[0]
    assert f"newest: {ckpts / 'step_00000001'}" in ranks[0]["error"], ranks[0]
    for rank in ranks:
        assert rank["latest"] == str(ckpts / "step_00000001") and rank["partials"] == ["step_00000002.partial"], rank


@pytest.mark.parametrize("name", STEP_FAILS)
def test_a_step_that_fails_on_every_rank_while_a_write_is_pending_completes_it(cases, name):
    """Step 3's loss raises on both ranks while step 2 is written in the background: the save holds
    step 2's state, so it is completed (each rank's write results handed to rank 0 over the job's
    store, not a collective) and becomes `latest`; the error says so. It stayed `.partial`, with
    step 1 `latest`, and nothing said so. The second time in one process (a new trainer) the ranks
    agreed under the first one's store keys: rank 1 read its `done` and said so before rank 0 had
    completed the save."""
    ckpts, ranks = cases(name)
    for rank in ranks:
        assert rank["error"] == "the loss of step 3 failed", rank
        assert rank["notes"] == [f"the checkpoint written in the background when the run stopped was completed: "
                                 f"{ckpts / 'step_00000002'} (`latest`: a resume continues from it)"], rank
        assert rank["latest"] == str(ckpts / "step_00000002") and rank["partials"] == [], rank
    # rank 0 takes every rank's write results from the job's store in one request, not one a rank
    assert ranks[0]["asked"].get("multi_get") == 1 and ranks[0]["asked"].get("get") == 1, ranks[0]
    assert json.loads((ckpts / "step_00000002" / "trainer_state.json").read_text())["step"] == 2
    assert sorted(p.name for p in (ckpts / "step_00000002").iterdir()) == sorted(
        p.name for p in (ckpts / "step_00000001").iterdir())  # .metadata, metadata.json, shards, state


def test_a_step_that_fails_on_one_rank_while_a_write_is_pending_leaves_it_partial_and_exits(reference, resumed):
    """Step 3's loss raises on rank 1 alone while step 2's writer is still writing (held back): rank 0
    waits in the step's gradient reduction and can take part in nothing, so rank 1 stops its writer,
    says that step 2 stays `.partial` and step 1 is the one kept, and exits; torchrun then ends rank
    0, whose writer ends with it. Rank 1 waited for its writer at exit for good (the test's timeout)."""
    tmp = reference[0] / "async_one_fails"
    # rank 0 ends without a result (torchrun ends it)
    (rank,) = runs_worker.result(tmp, "one_fails", (1,), log=reference[0] / f"{_label('resumes', LAYOUTS)}.log")
    ckpts = tmp / "one_fails_run" / "checkpoints"
    assert rank["error"] == "the loss of step 3 failed", rank
    assert rank["notes"] == [f"the checkpoint written in the background when the run stopped was not completed "
                             f"(not every rank stopped within {AGREE_S} s; a rank still in a step cannot take part): "
                             f"step_00000002.partial stays in {ckpts}; the newest complete checkpoint, which a "
                             f"resume continues from, is {ckpts / 'step_00000001'}"], rank
    assert (ckpts / "latest").read_text() == "step_00000001"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000001", "step_00000002.partial"]
    # rank 1 asked the store for rank 0's decision through the wait, AGREE_S + 1 s: every 50 ms (80 times,
    # from each of a job's ranks), now every DECISION_POLL_S
    assert rank["asked"]["check"] <= (AGREE_S + 1) / checkpoint_async.DECISION_POLL_S + 2, rank["asked"]
    writers = [int((tmp / f"one_fails.writer{r}").read_text()) for r in range(2)]
    assert not _left_running(writers), writers


def test_a_kill_while_a_write_is_pending_keeps_the_last_complete_step_and_no_writer(tmp_path):
    """The process is killed while the step-2 writer is held back: step 1 stays `latest`, step 2 only
    `.partial`, and neither the writer nor the results server outlives the trainer (they would go
    on holding its memory, and the writer would write into a directory a restarted run reuses)."""
    (pids,) = _run_scenario(tmp_path, "killed", 1)
    ckpts = tmp_path / "killed_run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000001"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000001", "step_00000002.partial"]
    left = _left_running(pids.values())
    assert not left, f"still running after the trainer was killed: {left}"


def _left_running(pids) -> list:
    """The processes of `pids` still running 5 s on (then killed, not to outlive the test)."""
    left = []
    for pid in pids:
        for _ in range(50):
            if not _running(pid):
                break
            time.sleep(0.1)
        else:
            left.append(pid)
            os.kill(pid, signal.SIGKILL)
    return left


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
