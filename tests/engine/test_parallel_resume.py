"""Resuming against the uninterrupted single-process run (the harness: tests/engine/parity.py), at
the same layout and from a TP2 checkpoint at TP1.

Runs whose evaluation nothing compares skip it, and resumed runs save no checkpoint at the end
(NO_END_SAVE); a saved step that several tests resume from is saved once (module fixtures), each
resume reading a copy of its own. The TP2 and the dp_reshardable saves run AdamW's foreach kernel, as
the code before engine.optimizer_state.use_fused_adam did, and their resumes the fused one: the
resumes of tests/engine/test_optim_fused_resume.py's checkpoints in the distributed optimizer's two
formats (a fused save resumes in the DP2 stop-file run and the bf16 runs).
"""
from __future__ import annotations

import functools
import json
import shutil

import pytest

from tests.engine.parity import NO_END_SAVE, STEPS, assert_same_run, run_worker
from tests.engine.test_optim_fused_resume import adam_run, assert_kernel, foreach_run

DPR = "checkpoint.optimizer_format=dp_reshardable"
BF16 = ("train.precision=bf16", "train.steps=5")


def _resume(tmp, name, nproc, *overrides, init, run=run_worker):
    return run(tmp, name, nproc, *overrides, "checkpoint.resume=true", NO_END_SAVE, init=init, evaluate=False)


def test_checkpoint_saved_at_tp2_with_foreach_adamw_resumes_at_tp1_fused(reference):
    """A TP2 save resumes at TP1 with the uninterrupted losses (steps 1-2 from the checkpointed
    history, 3-4 after resuming), on AdamW's fused kernel though the save ran the foreach one
    (tests/engine/test_optim_fused_resume.py). Also a checkpoint from before
    checkpoint.optimizer_format: its state names no format, and loads as the one it was written in
    (fully_reshardable). A resume at the layout saved at: the DP2 tests below, and the bf16 ones in
    one process."""
    tmp, init, ref = reference
    foreach_run(tmp, "reshard", 2, "parallel.tp=2", "train.exit_at_step=2", init=init)
    state_file = tmp / "reshard" / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("optimizer_format") == "fully_reshardable"
    state_file.write_text(json.dumps(state))
    resumed = _resume(tmp, "reshard", 1, init=init, run=adam_run)
    assert_kernel(resumed, True, STEPS - 2)
    assert_same_run(ref, resumed)
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS


@pytest.fixture(scope="module")
def dp2_stopped(reference):
    """A DP2 run that a stop file stops after step 1 (its checkpoint is the DP2 save both DP2 tests
    read), a copy of its run directory for the DP1 resume, and the DP2 run resumed from it:
    (first run, resumed run, stop file)."""
    tmp, init, _ = reference
    stop = tmp / "STOP_dp2"
    stop.touch()
    first = run_worker(tmp, "dp2", 2, f"train.stop_file={stop}", init=init, evaluate=False)
    shutil.copytree(tmp / "dp2", tmp / "dp2_to_dp1")
    resumed = _resume(tmp, "dp2", 2, f"train.stop_file={stop}", init=init)
    return first, resumed, stop


def test_dp2_saves_and_loads_in_parallel_and_resumes_at_dp2_and_dp1(reference, dp2_stopped):
    """With two data-parallel replicas both write the checkpoint (megatron's fully parallel save:
    each replica about half of the replicated shards; DP rank 0 wrote them all before); the files
    are the same format, so the save resumes at DP2 and at DP1 alike (from step 1: steps 2-4 depend
    on the restored Adam moments, step count and schedule)."""
    tmp, init, ref = reference
    _, resumed, _ = dp2_stopped
    step = tmp / "dp2_to_dp1" / "checkpoints" / "step_00000001"
    sizes = {f.name: f.stat().st_size for f in step.glob("__*.distcp")}
    by_rank = [sum(v for k, v in sizes.items() if k.startswith(f"__{r}_")) for r in range(2)]
    assert min(by_rank) > 0.25 * sum(by_rank), sizes  # both replicas wrote a share
    assert_same_run(ref, resumed)
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS
    one = _resume(tmp, "dp2_to_dp1", 1, init=init)
    assert_same_run(ref, one, steps=range(2, STEPS + 1))


def test_a_stop_file_seen_by_rank_0_stops_every_rank_at_the_same_step(reference, dp2_stopped):
    """train.stop_file over two data-parallel ranks: rank 0 looks, every rank stops after the same
    step (one broadcast scalar), the checkpoint is complete, and the resumed run gives the
    uninterrupted losses."""
    _, _, ref = reference
    first, resumed, stop = dp2_stopped
    assert [r["step"] for r in first["history"]] == [1] and not stop.exists()
    assert_same_run(ref, resumed)
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS


@pytest.fixture(scope="module")
def dpr_saved(reference):
    """A DP2 run saved at step 2 with checkpoint.optimizer_format=dp_reshardable, on foreach AdamW:
    its step directory, and a fresh copy of its run directory per call (name) for each test that
    resumes from it."""
    tmp, init, _ = reference
    foreach_run(tmp, "dpr", 2, DPR, "train.exit_at_step=2", init=init)
    step = tmp / "dpr" / "checkpoints" / "step_00000002"

    def copy(name):
        shutil.copytree(tmp / "dpr", tmp / name)
        return name

    return step, copy


def test_dp_reshardable_optimizer_state_resumes_at_any_dp_and_is_refused_at_another_tp(reference, dpr_saved):
    """checkpoint.optimizer_format=dp_reshardable: every rank writes and reads its own share of the
    optimizer state; a DP2 save resumes at DP2 and DP1 with the uninterrupted losses (step 4 depends
    on the restored Adam moments and step count), on fused AdamW though the save ran foreach
    (tests/engine/test_optim_fused_resume.py), and a TP2 resume is refused before any load (one
    without the distributed optimizer too: tests/engine/test_resume_checks.py, a check the Trainer's
    resume runs before the load, as tests/engine/test_trainer.py's changed-distributed-optimizer
    test shows)."""
    tmp, init, ref = reference
    step, copy = dpr_saved
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["optimizer_format"] == "dp_reshardable"
    resumed = _resume(tmp, copy("dpr_dp2"), 2, DPR, init=init, run=adam_run)
    assert_kernel(resumed, True, STEPS - 2)
    assert_same_run(ref, resumed)
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS
    one = _resume(tmp, copy("dpr_dp1"), 1, DPR, init=init, run=adam_run)
    assert_kernel(one, True, STEPS - 2)
    assert_same_run(ref, one, steps=range(3, STEPS + 1))
    proc = run_worker(tmp, copy("dpr_tp2"), 2, DPR, "parallel.tp=2", "checkpoint.resume=true", init=init,
                      refused=True)
    assert "parallel.tp=1 when saved, 2 now" in proc.stderr + proc.stdout
    assert "checkpoint.optimizer_format=dp_reshardable" in proc.stderr + proc.stdout
    # its weights load at any layout (checkpoint.init_from): a TP2 run from them trains as a TP1 run does
    tp2 = run_worker(tmp, "from_dpr_tp2", 2, "parallel.tp=2", "train.steps=1", NO_END_SAVE, init=str(step),
                     evaluate=False)
    tp1 = run_worker(tmp, "from_dpr_tp1", 1, "train.steps=1", NO_END_SAVE, init=str(step), evaluate=False)
    assert_same_run(tp1, tp2, steps=[1])


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory):
    """The uninterrupted bf16 run (one process, five steps, fully_reshardable), which also saves at
    step 3, and its initial weights: (directory, initial weights, result)."""
    tmp = tmp_path_factory.mktemp("bf16")
    init = str(tmp / "init")
    ref = run_worker(tmp, "ref", 1, *BF16, "checkpoint.save_interval=3", NO_END_SAVE, save_init=init, evaluate=False)
    return tmp, init, ref


@pytest.mark.parametrize("fmt", ["fully_reshardable", "dp_reshardable"])
def test_bf16_resume_restores_the_fp32_main_weights(bf16_reference, fmt):
    """In bf16 the distributed optimizer updates fp32 main weights of its own (in fp32 they are the
    model's parameters, which the tests above restore): resumed from step 3, step 5's loss is the
    first that an update from the restored main weights gives (left out, they restart from the
    bf16-rounded weights: 0.4% off at the next step's loss, measured). fully_reshardable resumes the
    reference's own step-3 save (one run fewer). On the CPU the resumed run repeats the uninterrupted
    one's numbers; tests/gpu/test_resume_gpu.py does the same on a GPU within bf16's rounding."""
    tmp, init, ref = bf16_reference
    setting = f"checkpoint.optimizer_format={fmt}"
    if fmt == "fully_reshardable":
        shutil.copytree(tmp / "ref", tmp / fmt)
    else:
        run_worker(tmp, fmt, 1, *BF16, setting, "train.exit_at_step=3", init=init, evaluate=False)
    resumed = _resume(tmp, fmt, 1, *BF16, setting, init=init)
    assert [row["step"] for row in resumed["history"]] == [1, 2, 3, 4, 5]  # 1-3 from the checkpointed history
    assert_same_run(ref, resumed, steps=(4, 5))


def test_a_vocabulary_padded_otherwise_at_another_tp_resumes_and_a_shard_one_rank_reads_stops_every_rank(tmp_path):
    """model.vocab_size=65 is padded to 66 rows at TP2 (megatron splits the table evenly), 65 at
    TP1: the TP2 step's LM head (train.aux_lm_weight > 0, a layer of this engine's) did not load at
    TP1 (megatron's global shape mismatch, reported as damaged files: 'move ... out of ...'), where
    the embedding, which megatron marks to load across it, did. The TP1 run resumes with the
    uninterrupted TP2 run's losses (data of its own: the reference's vocabulary is 64).
    The same step without the shard file only rank 1 reads: megatron reads each rank's part on that
    rank alone, so rank 1 failed and rank 0 went on into the run, whose error (the one a run prints)
    was then a broken collective; every rank now stops with rank 1's error."""
    odd = "model.vocab_size=65"
    first = run_worker(tmp_path, "odd_vocab", 2, odd, "parallel.tp=2", "checkpoint.save_interval=2",
                       "checkpoint.keep=0", evaluate=False)
    ckpts = tmp_path / "odd_vocab" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")
    shutil.copytree(tmp_path / "odd_vocab", tmp_path / "lost_shard")
    resumed = _resume(tmp_path, "odd_vocab", 1, odd, init=None)
    assert [row["step"] for row in resumed["history"]] == [1, 2, 3, 4]  # 1-2 from the checkpointed history
    assert_same_run(first, resumed, steps=range(3, STEPS + 1))

    step = tmp_path / "lost_shard" / "checkpoints" / "step_00000002"
    lost = sorted(step.glob("__1_*.distcp"))
    assert lost
    for f in lost:
        f.unlink()
    refused = _resume(tmp_path, "lost_shard", 2, odd, "parallel.tp=2", init=None,
                      run=functools.partial(run_worker, refused=True))
    said = [line for line in refused.stderr.splitlines() if "CheckpointError" in line]
    rank0 = [line for line in said if line.startswith("[rank0]")]
    assert rank0, refused.stderr[-3000:]
    assert f"{step}: the checkpoint does not read back" in rank0[0] and "(found by rank 1," in rank0[0], rank0
