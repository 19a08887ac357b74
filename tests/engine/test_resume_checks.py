"""engine.resume_checks: what a resume must agree with, checked on step directories written by hand."""
import json

import pytest

from engine import checkpoint, resume_checks
from engine.config import ConfigError
from tests.engine.test_checkpoint import _step


def test_changed_optimizer_and_order_settings_are_named(tmp_path):
    from engine.config import ConfigError, TrainConfig

    train = TrainConfig()
    step = _step(tmp_path, 3, {"step": 3, "settings": resume_checks.optimizer_settings(train),
                               "loader": {"consumed_batches": 3, "global_batch": train.global_batch,
                                          "seed": train.seed}})
    resume_checks.check_resume_settings(str(step), train)
    changed = TrainConfig(lr=2e-3, steps=400, adam_beta2=0.99, seed=7)
    with pytest.raises(ConfigError) as err:
        resume_checks.check_resume_settings(str(step), changed)
    msg = str(err.value)
    for part in ("train.lr=0.001 when saved, 0.002 now", "train.steps=200 when saved, 400 now",
                 "train.adam_beta2=0.95 when saved, 0.99 now", "train.seed=1234 when saved, 7 now",
                 f"checkpoint.init_from={step}"):
        assert part in msg, msg
    assert "warmup" not in msg and "grad_clip" not in msg
    resume_checks.check_resume_settings(str(step), TrainConfig(steps=400, grad_clip=0.5), skip=("train.steps",))


def test_a_step_saved_without_settings_is_not_checked(tmp_path):
    from engine.config import TrainConfig

    step = _step(tmp_path, 3, {"step": 3, "loader": {"consumed_batches": 3}})
    resume_checks.check_resume_settings(str(step), TrainConfig(lr=5.0, global_batch=99))


def test_a_dp_reshardable_optimizer_state_resumes_only_at_its_tensor_and_pipeline_layout(tmp_path):
    from engine.config import ConfigError

    layout = {"tp": 2, "pp": 2, "dp": 4, "vpp": 2}
    d = _step(tmp_path, 3, {"step": 3, "optimizer_format": "dp_reshardable", "layout": layout})
    resume_checks.check_resume_layout(str(d), tp=2, pp=2, vpp=2)  # any data-parallel size
    for now, named in (((1, 2, 2), "parallel.tp=2 when saved, 1 now"), ((2, 4, 2), "parallel.pp=2 when saved, 4 now"),
                       ((2, 2, None), "parallel.vpp=2 when saved, None now")):
        with pytest.raises(ConfigError, match="optimizer_format=dp_reshardable") as e:
            resume_checks.check_resume_layout(str(d), *now)
        assert named in str(e.value) and str(d) in str(e.value)
    # the per-parameter format, and a step saved before the setting, resume at any layout
    for state in ({"step": 3, "optimizer_format": "fully_reshardable", "layout": layout}, {"step": 3, "layout": layout}):
        (d / checkpoint.STATE_FILE).write_text(json.dumps(state))
        resume_checks.check_resume_layout(str(d), tp=1, pp=1, vpp=None)


def test_a_step_with_fp32_layer_norms_beside_a_bf16_final_norm_is_refused(runtime, tmp_path):
    """A bf16 run's step saved while the layers' norms were fp32 (the final norm bf16): its optimizer state
    for the norms lies under each other's names, so a resume would give each norm a neighbour's state;
    refused naming init_from. A step of one dtype throughout (fp32 run, or bf16 now) passes."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    def save(where, norm_dtype, final_dtype):
        where.mkdir()
        dist_checkpointing.save({
            "n": ShardedTensor.from_rank_offsets("backbone.decoder.layers.mlp.linear_fc1.layer_norm_weight",
                                                torch.ones(2, 8, dtype=norm_dtype)),
            "o": ShardedTensor.from_rank_offsets("optimizer.state.param.final_norm.weight", torch.ones(8)),
            "f": ShardedTensor.from_rank_offsets("final_norm.weight", torch.ones(8, dtype=final_dtype))},
            str(where))
        return str(where)

    old = save(tmp_path / "old", torch.float32, torch.bfloat16)
    with pytest.raises(ConfigError, match=r"layers' norm weights in float32 beside a bfloat16 final norm.*"
                                          rf"checkpoint.init_from={old}$"):
        resume_checks.check_resume_norm_dtypes(old)
    resume_checks.check_resume_norm_dtypes(save(tmp_path / "bf16", torch.bfloat16, torch.bfloat16))
    resume_checks.check_resume_norm_dtypes(save(tmp_path / "fp32", torch.float32, torch.float32))


def test_a_resume_at_another_layout_says_so(tmp_path):
    """A layout other than the step's that loads (any, in the per-parameter format; another DP size in
    dp_reshardable) went on without a word: a note now, naming both layouts; none at the same one, or
    for a step that recorded none."""
    layout = {"tp": 2, "pp": 2, "dp": 4, "vpp": 2}
    d = _step(tmp_path, 3, {"step": 3, "optimizer_format": "fully_reshardable", "layout": layout})
    assert resume_checks.check_resume_layout(str(d), 2, 2, 2, dp=4) == []
    note, = resume_checks.check_resume_layout(str(d), 4, 1, None, dp=2)
    assert note.startswith(f"note: {d} was saved at layout tp=2 pp=2 dp=4 vpp=2, this run is at tp=4 pp=1 dp=2 "
                           "vpp=None: its weights and optimizer state are resharded as they load"), note
    assert "the same global batches in the same order (train.global_batch, train.seed)" in note, note
    # the data-parallel size unknown (engine.pretrain's start-up check): compared without it
    assert resume_checks.check_resume_layout(str(d), 2, 2, 2) == []
    (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3, "optimizer_format": "dp_reshardable",
                                                       "layout": layout}))
    note, = resume_checks.check_resume_layout(str(d), 2, 2, 2, dp=8)
    assert "saved at layout tp=2 pp=2 dp=4 vpp=2, this run is at tp=2 pp=2 dp=8 vpp=2" in note, note
    (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3}))
    assert resume_checks.check_resume_layout(str(d), 4, 1, None, dp=2) == []


def test_a_dp_reshardable_optimizer_state_is_refused_without_the_distributed_optimizer(tmp_path):
    """Only megatron's distributed optimizer reads its buckets: a resume with
    parallel.distributed_optimizer=false is refused before the load, at the same layout too (the load
    failed as a checkpoint that 'does not read back', and advised moving the step away)."""
    from engine.config import ConfigError

    layout = {"tp": 1, "pp": 1, "dp": 2, "vpp": None}
    d = _step(tmp_path, 3, {"step": 3, "optimizer_format": "dp_reshardable", "layout": layout})
    resume_checks.check_resume_layout(str(d), 1, 1, None, distributed_optimizer=True)
    with pytest.raises(ConfigError, match="optimizer_format=dp_reshardable") as e:
        resume_checks.check_resume_layout(str(d), 1, 1, None, distributed_optimizer=False)
    assert "parallel.distributed_optimizer=true" in str(e.value) and "checkpoint.init_from" in str(e.value)
    (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3, "optimizer_format": "fully_reshardable",
                                                       "layout": layout}))
    resume_checks.check_resume_layout(str(d), 1, 1, None, distributed_optimizer=False)


def test_a_changed_distributed_optimizer_is_refused_in_the_per_parameter_format_too(tmp_path):
    """The plain and the distributed optimizer do not read each other's state in either format: the
    default fully_reshardable one failed inside the load (a raw ValueError, or a KeyError that called
    the step damaged). A step saved before the setting was recorded is not checked."""
    from engine.config import ConfigError

    layout = {"tp": 1, "pp": 1, "dp": 2, "vpp": None}
    for saved in (True, False):
        d = _step(tmp_path / str(saved), 3, {"step": 3, "optimizer_format": "fully_reshardable", "layout": layout,
                                             "distributed_optimizer": saved})
        resume_checks.check_resume_layout(str(d), 1, 1, None, distributed_optimizer=saved)
        with pytest.raises(ConfigError) as e:
            resume_checks.check_resume_layout(str(d), 2, 1, None, distributed_optimizer=not saved)
        assert (f"parallel.distributed_optimizer={str(saved).lower()} when saved, {str(not saved).lower()} now"
                in str(e.value)) and f"checkpoint.init_from={d}" in str(e.value), str(e.value)
    (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3, "optimizer_format": "fully_reshardable",
                                                       "layout": layout}))
    for now in (True, False):
        resume_checks.check_resume_layout(str(d), 1, 1, None, distributed_optimizer=now)


def test_changed_data_settings_are_named_and_a_moved_dataset_resumes(tmp_path):
    """The loader's own check said only 'the data order changed ... packed sequence count ... digest',
    whichever setting changed it. A dataset at another path with its packed sequence count is one moved or
    copied (to a node's local disk): the digest check decides. A step saved before the record: unchecked."""
    from engine.config import ConfigError

    saved = {"data.seq_length": 512, "data.path": "", "data.packing": "best_fit", "synthetic.seed": 0}
    d = _step(tmp_path, 3, {"step": 3, "data_settings": saved, "loader": {"consumed_batches": 3, "sequences": 9}})
    resume_checks.check_resume_data_settings(str(d), dict(saved))
    with pytest.raises(ConfigError) as e:
        resume_checks.check_resume_data_settings(str(d), {**saved, "data.packing": "ordered", "synthetic.seed": 1})
    msg = str(e.value)
    for part in ("data.packing=best_fit when saved, ordered now", "synthetic.seed=0 when saved, 1 now",
                 f"checkpoint.init_from={d}"):
        assert part in msg, msg
    with pytest.raises(ConfigError, match=r"data.path=\(empty\) when saved, /data/a now"):
        resume_checks.check_resume_data_settings(str(d), {"data.seq_length": 512, "data.path": "/data/a"})
    built = {"data.seq_length": 512, "data.path": "/data/a"}
    (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3, "data_settings": built,
                                                       "loader": {"consumed_batches": 3, "sequences": 9}}))
    # resumed, and said: the other path is taken as the step's dataset moved
    assert resume_checks.check_resume_data_settings(str(d), {**built, "data.path": "/local/a"}, sequences=9) == [
        f"note: data.path=/local/a now, /data/a when {d} was saved: resuming on it as that dataset moved or copied "
        "(the data order's checks compare its packed sequences with the step's record, and refuse another dataset)"]
    assert resume_checks.check_resume_data_settings(str(d), built, sequences=9) == []
    with pytest.raises(ConfigError, match="data.path=/data/a when saved, /local/b now"):
        resume_checks.check_resume_data_settings(str(d), {**built, "data.path": "/local/b"}, sequences=12)
    (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3, "loader": {"consumed_batches": 3}}))
    resume_checks.check_resume_data_settings(str(d), {**saved, "data.seq_length": 1024})


def test_the_same_dataset_path_written_otherwise_is_no_move(tmp_path, monkeypatch):
    """data.path as the step recorded it, written with a trailing slash, through ./ or absolute, names the
    same directory: no 'moved or copied' note (given as such since the note came), and no refusal naming
    data.path where its sequence count changed (the data order's check names the count)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    built = {"data.seq_length": 512, "data.path": "ds"}
    d = _step(tmp_path, 3, {"step": 3, "data_settings": built, "loader": {"consumed_batches": 3, "sequences": 9}})
    for same in ("ds/", "./ds", str(tmp_path / "ds")):
        assert resume_checks.check_resume_data_settings(str(d), {**built, "data.path": same}, sequences=9) == []
        assert resume_checks.check_resume_data_settings(str(d), {**built, "data.path": same}, sequences=12) == []
    note, = resume_checks.check_resume_data_settings(str(d), {**built, "data.path": "/local/ds"}, sequences=9)
    assert note.startswith(f"note: data.path=/local/ds now, ds when {d} was saved: resuming on it as that dataset "
                           "moved or copied"), note


def test_the_evaluation_sets_record_says_from_which_step_each_set_is_evaluated():
    """What a step records of its evaluation sets (a digest each, and the step after which the history's
    evaluations are of that set) and what a resume notes: a set changed since the step, none for a step
    saved before the record (its sets are unknown); a set new to the run is no change (eval_set_notes
    notes it)."""
    from engine.data import PackedGroups
    from tests.engine.dist_worker import random_groups

    a, b = (PackedGroups(random_groups(seed, 12, 64, 64), 64) for seed in (3, 4))
    start = resume_checks.eval_sets({"held_out": a}, 0, {})
    other = resume_checks.eval_sets({"held_out": b}, 0, {})["held_out"]["digest"]
    assert start["held_out"]["after_step"] == 0 and start["held_out"]["digest"] != other
    state = {"step": 5, "eval_sets": start}
    assert resume_checks.changed_eval_sets(state, {"held_out": a}) == {}
    assert resume_checks.eval_sets({"held_out": a}, 5, start) == start  # kept: the same set since step 0
    assert resume_checks.changed_eval_sets(state, {"held_out": b, "new": a}) == {
        "held_out": (start["held_out"]["digest"], other)}
    assert {k: v["after_step"] for k, v in resume_checks.eval_sets({"held_out": b, "new": a}, 5, start).items()} == \
        {"held_out": 5, "new": 5}
    # a step saved before the record: no note, and no step claimed
    assert resume_checks.changed_eval_sets({"step": 5}, {"held_out": b}) == {}
    assert "after_step" not in resume_checks.eval_sets({"held_out": b}, 5, None)["held_out"]


def test_a_resume_notes_the_evaluation_sets_gone_or_new_since_the_step():
    """A set the step recorded that the run no longer has (its rows stay in the history, summary.json's
    eval_sets no longer names it) and one the step did not record (its rows start after the step): a note
    each, which were silent; none for the same sets or a step saved before the record."""
    from engine.data import PackedGroups
    from tests.engine.dist_worker import random_groups

    a, b = (PackedGroups(random_groups(seed, 12, 64, 64), 64) for seed in (3, 4))
    history = [{"step": 2, "eval": "held_out", "loss": 0.7}, {"step": 2, "eval": "seen", "loss": 0.6},
               {"step": 4, "loss": 0.5}, {"step": 4, "eval": "held_out", "loss": 0.6}]
    state = {"step": 5, "eval_sets": resume_checks.eval_sets({"held_out": a, "seen": b}, 0, {}), "history": history}
    assert resume_checks.eval_set_notes("ck/step_5", state, {"held_out": a, "seen": b}) == []
    assert resume_checks.eval_set_notes("ck/step_5", state, {"held_out": a, "fresh": b}) == [
        "note: the evaluation set seen recorded by ck/step_5 is not in this run: its rows in the eval history end at "
        "step 2 (summary.json's eval_sets no longer lists it)",
        "note: the evaluation set fresh is new since ck/step_5: its history starts after step 5 (summary.json: "
        "eval_sets.fresh.after_step=5)"]
    assert "the eval history has no rows of it" in resume_checks.eval_set_notes(
        "ck/step_5", {**state, "history": []}, {"held_out": a})[0]
    assert resume_checks.eval_set_notes("ck/step_5", {"step": 5, "history": history}, {"fresh": b}) == []


def test_one_function_gives_the_notes_of_changed_gone_and_new_sets():
    """The note of a changed set came from engine/pretrain.py before the trainer was built, those of sets
    gone and new from the trainer: eval_set_notes gives all three, the changed one first, naming the
    held-out file where the run has that one set."""
    from engine.data import PackedGroups
    from tests.engine.dist_worker import random_groups

    a, b, c = (PackedGroups(random_groups(seed, 12, 64, 64), 64) for seed in (3, 4, 5))
    history = [{"step": 2, "eval": "held_out", "loss": 0.7}, {"step": 4, "eval": "seen", "loss": 0.6}]
    start = resume_checks.eval_sets({"held_out": a, "seen": b}, 0, {})
    state = {"step": 5, "eval_sets": start, "history": history}
    now = resume_checks.eval_sets({"held_out": c}, 0, {})["held_out"]["digest"]
    notes = resume_checks.eval_set_notes("ck/step_5", state, {"held_out": c, "fresh": a}, "data.eval_path=ev/")
    assert notes == [
        f"note: the held_out set is not the one ck/step_5 was evaluated on (digest {start['held_out']['digest']} "
        f"when saved, {now} now); resuming with it, not refused: the eval history's held_out rows up to step 5 are "
        "of the old set, from step 6 on (and the final evaluation) of this one (summary.json: "
        "eval_sets.held_out.after_step=5)",
        "note: the evaluation set seen recorded by ck/step_5 is not in this run: its rows in the eval history end at "
        "step 4 (summary.json's eval_sets no longer lists it)",
        "note: the evaluation set fresh is new since ck/step_5: its history starts after step 5 (summary.json: "
        "eval_sets.fresh.after_step=5)"]
    # the held-out file is named where it is the run's one set
    one = resume_checks.eval_set_notes("ck/step_5", state, {"held_out": c}, "data.eval_path=ev/")
    assert one[0].startswith("note: the held_out set (data.eval_path=ev/) is not the one ck/step_5"), one
    assert resume_checks.eval_set_notes("ck/step_5", {"step": 5}, {"held_out": c}, "data.eval_path=ev/") == []


def test_the_trainer_gives_the_notes_on_resume(runtime, tmp_path):
    """In process: a run evaluating held_out and seen at each step exits at step 2; resumed with held_out
    changed, seen gone and fresh added, the trainer gives eval_set_notes' three notes, once each (the
    changed set's came from engine/pretrain.py before), and records held_out and fresh after step 2.
    Resumed too at another layout than the one its step records (written as a DP2 save's) and with
    data.path naming the dataset at another path: both went on without a word, a note each now."""
    import json

    from engine.data import PackedGroups
    from tests.engine.dist_worker import random_groups
    from tests.engine.test_trainer import make_trainer

    a, b, c = (PackedGroups(random_groups(seed, 8, 64, 64), 64) for seed in (3, 4, 5))
    for where in ("data", "local"):
        (tmp_path / where).mkdir()
    make_trainer(runtime, tmp_path, "train.exit_at_step=2", "train.eval_interval=1", f"data.path={tmp_path / 'data'}",
                 evals={"held_out": a, "seen": b}).fit()
    step_dir = checkpoint.latest(str(tmp_path / "checkpoints"))
    state_file = tmp_path / "checkpoints" / "step_00000002" / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["layout"] == {"tp": 1, "pp": 1, "dp": 1, "vpp": None}, state["layout"]
    state_file.write_text(json.dumps({**state, "layout": {**state["layout"], "dp": 2}}))
    lines = []
    trainer = make_trainer(runtime, tmp_path, f"data.path={tmp_path / 'local'}", evals={"held_out": c, "fresh": b},
                           log=lambda *x, **k: lines.append(" ".join(map(str, x))))
    notes = [x for x in lines if x.startswith("note:")]
    assert notes[0] == (f"note: {step_dir} was saved at layout tp=1 pp=1 dp=2 vpp=None, this run is at tp=1 pp=1 "
                        "dp=1 vpp=None: its weights and optimizer state are resharded as they load, and the training "
                        "goes on with the same global batches in the same order (train.global_batch, train.seed); "
                        "the losses may differ from an uninterrupted run's in the last digits (sums reduced in "
                        "another order)"), notes
    assert notes[1].startswith(f"note: data.path={tmp_path / 'local'} now, {tmp_path / 'data'} when {step_dir} was "
                               "saved: resuming on it as that dataset moved or copied"), notes
    notes = notes[2:]
    assert notes == resume_checks.eval_set_notes(step_dir, checkpoint.read_state(step_dir),
                                                 {"held_out": c, "fresh": b}), lines
    assert len(notes) == 3 and "the held_out set is not the one" in notes[0], notes
    assert "seen" in notes[1] and "its rows in the eval history end at step 2" in notes[1], notes
    assert "fresh" in notes[2] and "after step 2" in notes[2], notes
    assert trainer.eval_sets["fresh"]["after_step"] == 2 and "seen" not in trainer.eval_sets
    assert trainer.eval_sets["held_out"]["after_step"] == 2


def test_a_changed_derived_setting_says_to_set_back_what_it_is_derived_from(tmp_path):
    """Fine-tuning derives train.steps from finetune.epochs and the data; a resume with other epochs said
    '(derived from finetune.epochs and the data: both as they were)', which read as if neither had changed."""
    from engine.config import TrainConfig

    step = _step(tmp_path, 3, {"step": 3, "settings": resume_checks.optimizer_settings(TrainConfig(steps=27))})
    with pytest.raises(ConfigError) as err:
        resume_checks.check_resume_settings(str(step), TrainConfig(steps=53),
                                            derived_from={"train.steps": "finetune.epochs"})
    assert ("train.steps=27 when saved, 53 now (derived from finetune.epochs and the data: set finetune.epochs and "
            "the data back as they were)") in str(err.value), str(err.value)
