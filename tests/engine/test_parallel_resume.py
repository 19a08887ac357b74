"""Resuming against the uninterrupted single-process run (the harness: tests/engine/parity.py), at
the same layout and from a TP2 checkpoint at TP1."""
from __future__ import annotations

import json
import shutil

from tests.engine.parity import STEPS, assert_same_run, run_worker


def test_resume_gives_the_uninterrupted_losses(reference):
    tmp, init, ref = reference
    run_worker(tmp, "resume", 1, "train.exit_at_step=2", init=init)
    resumed = run_worker(tmp, "resume", 1, "checkpoint.resume=true", init=init)
    assert_same_run(ref, resumed)  # steps 1-2 from the checkpointed history, 3-4 after resuming
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS


def test_checkpoint_saved_at_tp2_resumes_at_tp1(reference):
    """Also a checkpoint from before checkpoint.optimizer_format: its state names no format, and
    loads as the one it was written in (fully_reshardable)."""
    tmp, init, ref = reference
    run_worker(tmp, "reshard", 2, "parallel.tp=2", "train.exit_at_step=2", init=init)
    state_file = tmp / "reshard" / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("optimizer_format") == "fully_reshardable"
    state_file.write_text(json.dumps(state))
    resumed = run_worker(tmp, "reshard", 1, "checkpoint.resume=true", init=init)
    assert_same_run(ref, resumed, steps=range(3, STEPS + 1))


def test_dp2_saves_and_loads_in_parallel_and_resumes_at_dp2_and_dp1(reference):
    """With two data-parallel replicas both write the checkpoint (megatron's fully parallel save:
    each replica about half of the replicated shards; DP rank 0 wrote them all before); the files
    are the same format, so the save resumes at DP2 and at DP1 alike."""
    tmp, init, ref = reference
    run_worker(tmp, "dp2", 2, "train.exit_at_step=2", init=init)
    sizes = {f.name: f.stat().st_size for f in (tmp / "dp2" / "checkpoints" / "step_00000002").glob("__*.distcp")}
    by_rank = [sum(v for k, v in sizes.items() if k.startswith(f"__{r}_")) for r in range(2)]
    assert min(by_rank) > 0.25 * sum(by_rank), sizes  # both replicas wrote a share
    resumed = run_worker(tmp, "dp2", 2, "checkpoint.resume=true", init=init)
    assert_same_run(ref, resumed)
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS
    run_worker(tmp, "dp2_to_dp1", 2, "train.exit_at_step=2", init=init)
    one = run_worker(tmp, "dp2_to_dp1", 1, "checkpoint.resume=true", init=init)
    assert_same_run(ref, one, steps=range(3, STEPS + 1))


def test_dp_reshardable_optimizer_state_resumes_at_any_dp_and_is_refused_at_another_tp(reference):
    """checkpoint.optimizer_format=dp_reshardable: every rank writes and reads its own share of the
    optimizer state; a DP2 save resumes at DP2 and DP1 with the uninterrupted losses (step 4 depends
    on the restored Adam moments and step count), and a TP2 resume is refused before any load."""
    tmp, init, ref = reference
    fmt = "checkpoint.optimizer_format=dp_reshardable"
    run_worker(tmp, "dpr", 2, fmt, "train.exit_at_step=2", init=init)
    state = json.loads((tmp / "dpr" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["optimizer_format"] == "dp_reshardable"
    for copy in ("dpr_dp1", "dpr_tp2"):
        shutil.copytree(tmp / "dpr", tmp / copy)
    resumed = run_worker(tmp, "dpr", 2, fmt, "checkpoint.resume=true", init=init)
    assert_same_run(ref, resumed)
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS
    one = run_worker(tmp, "dpr_dp1", 1, fmt, "checkpoint.resume=true", init=init)
    assert_same_run(ref, one, steps=range(3, STEPS + 1))
    proc = run_worker(tmp, "dpr_tp2", 2, fmt, "parallel.tp=2", "checkpoint.resume=true", init=init, refused=True)
    assert "parallel.tp=1 when saved, 2 now" in proc.stderr + proc.stdout
    assert "checkpoint.optimizer_format=dp_reshardable" in proc.stderr + proc.stdout
    # its weights load at any layout (checkpoint.init_from): a TP2 run from them trains as a TP1 run does
    step = str(tmp / "dpr" / "checkpoints" / "step_00000002")
    tp2 = run_worker(tmp, "from_dpr_tp2", 2, "parallel.tp=2", "train.steps=1", init=step)
    tp1 = run_worker(tmp, "from_dpr_tp1", 1, "train.steps=1", init=step)
    assert_same_run(tp1, tp2, steps=[1])


def test_a_stop_file_seen_by_rank_0_stops_every_rank_at_the_same_step(reference):
    """train.stop_file over two data-parallel ranks: rank 0 looks, every rank stops after the same
    step (one broadcast scalar), the checkpoint is complete, and the resumed run gives the
    uninterrupted losses."""
    tmp, init, ref = reference
    stop = tmp / "STOP_dp2"
    stop.touch()
    first = run_worker(tmp, "stopfile", 2, f"train.stop_file={stop}", init=init)
    assert [r["step"] for r in first["history"]] == [1] and not stop.exists()
    resumed = run_worker(tmp, "stopfile", 2, f"train.stop_file={stop}", "checkpoint.resume=true", init=init)
    assert_same_run(ref, resumed)
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS


def test_dp_reshardable_optimizer_state_is_refused_without_the_distributed_optimizer(tmp_path):
    """A resume with parallel.distributed_optimizer=false from a dp_reshardable step is refused before
    the load, naming the setting (the load failed, calling the checkpoint damaged)."""
    fmt = "checkpoint.optimizer_format=dp_reshardable"
    run_worker(tmp_path, "dpr", 1, fmt, "train.exit_at_step=2")
    proc = run_worker(tmp_path, "dpr", 1, fmt, "parallel.distributed_optimizer=false", "checkpoint.resume=true",
                      refused=True)
    out = proc.stderr + proc.stdout
    assert "parallel.distributed_optimizer=true" in out and "does not read back" not in out, out[-3000:]
