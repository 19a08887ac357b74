"""Resuming against the uninterrupted single-process run (the harness: tests/engine/parity.py), at
the same layout and from a TP2 checkpoint at TP1.

Runs whose evaluation nothing compares skip it, and resumed runs save no checkpoint at the end
(NO_END_SAVE); a saved step that several runs resume from is saved once, each resume reading a copy of
its own. The TP2 and the dp_reshardable saves run AdamW's foreach kernel, as the code before
engine.optimizer_state.use_fused_adam did, and their resumes the fused one: the resumes of
tests/engine/test_optim_fused_resume.py's checkpoints in the distributed optimizer's two formats (a
fused save resumes in the DP2 stop-file run and the bf16 runs).

Starting the ranks is most of a run's time: the module's runs share four launches
(tests/engine/runs_worker.py, each run with its own trainer, run directory and parallel layout), the
saves (two ranks; one process for the bf16 ones), then the resumes from them (two ranks; one
process), each resume in another process than its save.
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.engine import runs_worker
from tests.engine.parity import NO_END_SAVE, STEPS, assert_same_run
from tests.engine.test_optim_fused_resume import assert_kernel

DPR = "checkpoint.optimizer_format=dp_reshardable"
BF16 = ("train.precision=bf16", "train.steps=5")
ODD = "model.vocab_size=65"
# AdamW's kernel recorded, and chosen as tests/engine/test_optim_fused_resume.py's foreach_run does
ADAM, FOREACH = {"worker": "adam"}, {"worker": "adam", "env": {"ADAM_KERNEL": "foreach"}}
RESUME = ("checkpoint.resume=true", NO_END_SAVE)


@pytest.fixture(scope="module")
def saved(reference, tmp_path_factory):
    """The saves every test resumes from, in a two-rank launch, and the bf16 runs in a one-process
    one: (the reference's directory, the bf16 runs', the odd vocabulary's, {name: result}).

    `reshard`: TP2 on foreach AdamW, exits after step 2. `dp2`: DP2, a stop file stops it after step
    1 (`stop` the file). `dpr`: DP2 saved at step 2 with checkpoint.optimizer_format=dp_reshardable on
    foreach AdamW. `odd_vocab`: model.vocab_size=65 at TP2 (data of its own: the reference's
    vocabulary is 64), saving steps 2 and 4. `bf16_ref`: the uninterrupted bf16 run (five steps,
    fully_reshardable), which also saves at step 3, and its initial weights; `bf16_dpr` the same
    from them in dp_reshardable, exiting at step 3."""
    tmp, init, _ = reference
    bf16, odd = tmp_path_factory.mktemp("bf16"), tmp_path_factory.mktemp("odd_vocab")
    stop = tmp / "STOP_dp2"
    stop.touch()
    runs = [runs_worker.run(tmp, "reshard", "parallel.tp=2", "train.exit_at_step=2", init=init, evaluate=False,
                            **FOREACH),
            runs_worker.run(tmp, "dp2", f"train.stop_file={stop}", init=init, evaluate=False),
            runs_worker.run(tmp, "dpr", DPR, "train.exit_at_step=2", init=init, evaluate=False, **FOREACH),
            runs_worker.run(odd, "odd_vocab", ODD, "parallel.tp=2", "checkpoint.save_interval=2",
                            "checkpoint.keep=0", evaluate=False)]
    log = runs_worker.launch(tmp, "resume_saves", 2, runs)
    bf16_init = str(bf16 / "init")
    bf16_log = runs_worker.launch(bf16, "saves", 1, [
        runs_worker.run(bf16, "ref", *BF16, "checkpoint.save_interval=3", NO_END_SAVE, save_init=bf16_init,
                        evaluate=False),
        runs_worker.run(bf16, "dp_reshardable", *BF16, DPR, "train.exit_at_step=3", init=bf16_init,
                        evaluate=False)])
    results = {name: runs_worker.result(where, name, log=at) for where, name, at in (
        (tmp, "reshard", log), (tmp, "dp2", log), (tmp, "dpr", log), (odd, "odd_vocab", log),
        (bf16, "ref", bf16_log), (bf16, "dp_reshardable", bf16_log))}
    results["stop"] = stop
    return tmp, bf16, odd, results


@pytest.fixture(scope="module")
def resumed(reference, saved):
    """Every resume, each from a copy of a save of `saved` where another resume or a test reads the
    save itself: the two-rank ones in one launch, the one-process ones in another ->
    (`saved`'s directories and results, {name: result}); a refused run's result is each rank's
    error ({"type", "error"})."""
    _, init, _ = reference
    tmp, bf16, odd, saves = saved
    # a checkpoint from before checkpoint.optimizer_format: its state names no format
    state_file = tmp / "reshard" / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    saves["reshard_format"] = state.pop("optimizer_format")
    state_file.write_text(json.dumps(state))
    for run, copy in (("dp2", "dp2_to_dp1"), ("dpr", "dpr_dp2"), ("dpr", "dpr_dp1"), ("dpr", "dpr_tp2")):
        shutil.copytree(tmp / run, tmp / copy)
    ckpts = odd / "odd_vocab" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")
    shutil.copytree(odd / "odd_vocab", odd / "lost_shard")
    lost = sorted((odd / "lost_shard" / "checkpoints" / "step_00000002").glob("__1_*.distcp"))
    assert lost
    for f in lost:
        f.unlink()
    shutil.copytree(bf16 / "ref", bf16 / "fully_reshardable")
    dpr_step = str(tmp / "dpr" / "checkpoints" / "step_00000002")
    two = [runs_worker.run(tmp, "dp2", f"train.stop_file={saves['stop']}", *RESUME, init=init, evaluate=False),
           runs_worker.run(tmp, "dpr_dp2", DPR, *RESUME, init=init, evaluate=False, **ADAM),
           runs_worker.run(tmp, "from_dpr_tp2", "parallel.tp=2", "train.steps=1", NO_END_SAVE, init=dpr_step,
                           evaluate=False),
           runs_worker.run(tmp, "dpr_tp2", DPR, "parallel.tp=2", "checkpoint.resume=true", init=init, refused=True),
           # last: the error stops every rank inside megatron's load
           runs_worker.run(odd, "lost_shard", ODD, "parallel.tp=2", *RESUME, refused=True)]
    one = [runs_worker.run(tmp, "reshard", *RESUME, init=init, evaluate=False, **ADAM),
           runs_worker.run(tmp, "dp2_to_dp1", *RESUME, init=init, evaluate=False),
           runs_worker.run(tmp, "dpr_dp1", DPR, *RESUME, init=init, evaluate=False, **ADAM),
           runs_worker.run(tmp, "from_dpr_tp1", "train.steps=1", NO_END_SAVE, init=dpr_step, evaluate=False),
           runs_worker.run(odd, "odd_vocab", ODD, *RESUME, evaluate=False),
           *(runs_worker.run(bf16, fmt, *BF16, f"checkpoint.optimizer_format={fmt}", *RESUME, init=str(bf16 / "init"),
                             evaluate=False) for fmt in ("fully_reshardable", "dp_reshardable"))]
    log_two = runs_worker.launch(tmp, "resume_resumes", 2, two)
    log_one = runs_worker.launch(tmp, "resume_resumes_1", 1, one)
    got = {}
    for where, name, log in ((tmp, "dp2", log_two), (tmp, "dpr_dp2", log_two), (tmp, "from_dpr_tp2", log_two),
                             (tmp, "reshard", log_one), (tmp, "dp2_to_dp1", log_one), (tmp, "dpr_dp1", log_one),
                             (tmp, "from_dpr_tp1", log_one), (odd, "odd_vocab", log_one),
                             (bf16, "fully_reshardable", log_one), (bf16, "dp_reshardable", log_one)):
        got[name] = runs_worker.result(where, name, log=log)
    for where, name in ((tmp, "dpr_tp2"), (odd, "lost_shard")):
        got[name] = runs_worker.result(where, name, (0, 1), log=log_two)
    return saved, got


def test_checkpoint_saved_at_tp2_with_foreach_adamw_resumes_at_tp1_fused(reference, resumed):
    """A TP2 save resumes at TP1 with the uninterrupted losses (steps 1-2 from the checkpointed
    history, 3-4 after resuming), on AdamW's fused kernel though the save ran the foreach one
    (tests/engine/test_optim_fused_resume.py). Also a checkpoint from before
    checkpoint.optimizer_format: its state names no format, and loads as the one it was written in
    (fully_reshardable). A resume at the layout saved at: the DP2 tests below, and the bf16 ones in
    one process."""
    _, _, ref = reference
    (_, _, _, saves), got = resumed
    assert_kernel(saves["reshard"], False, len(saves["reshard"]["history"]))
    assert saves["reshard_format"] == "fully_reshardable"
    assert_kernel(got["reshard"], True, STEPS - 2)
    assert_same_run(ref, got["reshard"])
    assert got["reshard"]["start_step"] == 1 and len(got["reshard"]["history"]) == STEPS


def test_dp2_saves_and_loads_in_parallel_and_resumes_at_dp2_and_dp1(reference, resumed):
    """With two data-parallel replicas both write the checkpoint (megatron's fully parallel save:
    each replica about half of the replicated shards; DP rank 0 wrote them all before); the files
    are the same format, so the save resumes at DP2 and at DP1 alike (from step 1: steps 2-4 depend
    on the restored Adam moments, step count and schedule)."""
    _, _, ref = reference
    (tmp, _, _, _), got = resumed
    step = tmp / "dp2_to_dp1" / "checkpoints" / "step_00000001"
    sizes = {f.name: f.stat().st_size for f in step.glob("__*.distcp")}
    by_rank = [sum(v for k, v in sizes.items() if k.startswith(f"__{r}_")) for r in range(2)]
    assert min(by_rank) > 0.25 * sum(by_rank), sizes  # both replicas wrote a share
    assert_same_run(ref, got["dp2"])
    assert got["dp2"]["start_step"] == 1 and len(got["dp2"]["history"]) == STEPS
    assert_same_run(ref, got["dp2_to_dp1"], steps=range(2, STEPS + 1))


def test_a_stop_file_seen_by_rank_0_stops_every_rank_at_the_same_step(reference, resumed):
    """train.stop_file over two data-parallel ranks: rank 0 looks, every rank stops after the same
    step (one broadcast scalar), the checkpoint is complete, and the resumed run gives the
    uninterrupted losses."""
    _, _, ref = reference
    (_, _, _, saves), got = resumed
    assert [r["step"] for r in saves["dp2"]["history"]] == [1] and not saves["stop"].exists()
    assert_same_run(ref, got["dp2"])
    assert got["dp2"]["start_step"] == 1 and len(got["dp2"]["history"]) == STEPS


def test_dp_reshardable_optimizer_state_resumes_at_any_dp_and_is_refused_at_another_tp(reference, resumed):
    """checkpoint.optimizer_format=dp_reshardable: every rank writes and reads its own share of the
    optimizer state; a DP2 save resumes at DP2 and DP1 with the uninterrupted losses (step 4 depends
    on the restored Adam moments and step count), on fused AdamW though the save ran foreach
    (tests/engine/test_optim_fused_resume.py), and a TP2 resume is refused before any load (one
    without the distributed optimizer too: tests/engine/test_resume_checks.py, a check the Trainer's
    resume runs before the load, as tests/engine/test_trainer.py's changed-distributed-optimizer
    test shows)."""
    _, _, ref = reference
    (tmp, _, _, saves), got = resumed
    assert_kernel(saves["dpr"], False, len(saves["dpr"]["history"]))
    state = json.loads((tmp / "dpr" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["optimizer_format"] == "dp_reshardable"
    assert_kernel(got["dpr_dp2"], True, STEPS - 2)
    assert_same_run(ref, got["dpr_dp2"])
    assert got["dpr_dp2"]["start_step"] == 1 and len(got["dpr_dp2"]["history"]) == STEPS
    assert_kernel(got["dpr_dp1"], True, STEPS - 2)
    assert_same_run(ref, got["dpr_dp1"], steps=range(3, STEPS + 1))
    for rank in got["dpr_tp2"]:
        assert rank["type"] == "ConfigError", rank
        assert "parallel.tp=1 when saved, 2 now" in rank["error"], rank
        assert "checkpoint.optimizer_format=dp_reshardable" in rank["error"], rank
    # its weights load at any layout (checkpoint.init_from): a TP2 run from them trains as a TP1 run does
    assert_same_run(got["from_dpr_tp1"], got["from_dpr_tp2"], steps=[1])


@pytest.mark.parametrize("fmt", ["fully_reshardable", "dp_reshardable"])
def test_bf16_resume_restores_the_fp32_main_weights(resumed, fmt):
    """In bf16 the distributed optimizer updates fp32 main weights of its own (in fp32 they are the
    model's parameters, which the tests above restore): resumed from step 3, step 5's loss is the
    first that an update from the restored main weights gives (left out, they restart from the
    bf16-rounded weights: 0.4% off at the next step's loss, measured). fully_reshardable resumes the
    reference's own step-3 save (one run fewer). On the CPU the resumed run repeats the uninterrupted
    one's numbers; tests/gpu/test_resume_gpu.py does the same on a GPU within bf16's rounding."""
    (_, _, _, saves), got = resumed
    assert [row["step"] for row in got[fmt]["history"]] == [1, 2, 3, 4, 5]  # 1-3 from the checkpointed history
    assert_same_run(saves["ref"], got[fmt], steps=(4, 5))


def test_a_vocabulary_padded_otherwise_at_another_tp_resumes_and_a_shard_one_rank_reads_stops_every_rank(resumed):
    """model.vocab_size=65 is padded to 66 rows at TP2 (megatron splits the table evenly), 65 at
    TP1: the TP2 step's LM head (train.aux_lm_weight > 0, a layer of this engine's) did not load at
    TP1 (megatron's global shape mismatch, reported as damaged files: 'move ... out of ...'), where
    the embedding, which megatron marks to load across it, did. The TP1 run resumes with the
    uninterrupted TP2 run's losses (data of its own: the reference's vocabulary is 64).
    The same step without the shard file only rank 1 reads: megatron reads each rank's part on that
    rank alone, so rank 1 failed and rank 0 went on into the run, whose error (the one a run prints)
    was then a broken collective; every rank now stops with rank 1's error."""
    (_, _, odd, saves), got = resumed
    assert [row["step"] for row in got["odd_vocab"]["history"]] == [1, 2, 3, 4]  # 1-2 from the checkpointed history
    assert_same_run(saves["odd_vocab"], got["odd_vocab"], steps=range(3, STEPS + 1))
    step = odd / "lost_shard" / "checkpoints" / "step_00000002"
    rank0 = got["lost_shard"][0]
    assert rank0["type"] == "CheckpointError", rank0
    assert f"{step}: the checkpoint does not read back" in rank0["error"], rank0
    assert "(found by rank 1," in rank0["error"], rank0
