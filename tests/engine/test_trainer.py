"""engine.trainer.Trainer in one process: the learning rate each step applies and logs, one gradient
norm per step, throughput without evaluation and checkpoint time, and a resume that refuses
changed optimizer settings. A run whose checkpoint nothing reads saves none at its end (NO_END_SAVE)."""
from __future__ import annotations

import json
import shutil
import time
import types
from pathlib import Path

import pytest
import torch

from engine import checkpoint, resume_checks
from engine.config import ConfigError, EngineConfig
from engine.config_load import load_config
from engine.progress import dense_flops_per_token
from tests.engine.dist_worker import random_groups
from tests.engine.parity import NO_END_SAVE

SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
         "model.ffn_hidden_size=64", "model.vocab_size=64", "train.global_batch=4", "train.micro_batch=2",
         "train.lr=1e-2", "train.warmup_steps=2", "train.steps=4", "data.seq_length=64", "log.interval=1",
         "log.tensorboard=false"]


def make_trainer(runtime, run_dir, *overrides, evals=None, log=None):
    from engine.data import PackedGroups
    from engine.trainer import Trainer

    cfg = load_config(EngineConfig, None, SMALL + [f"run_dir={run_dir}", *overrides])
    data = PackedGroups(random_groups(3, 40, 64, 64), 64)
    return Trainer(cfg, runtime, data, str(run_dir), pad_id=0, log=log or (lambda *a, **k: None), evals=evals)


def params(trainer):
    return [p.detach().clone() for c in trainer.model for p in c.parameters()]


def test_each_step_logs_the_lr_it_applied_and_the_first_one_trains(runtime, tmp_path):
    """Step s runs at the schedule's value at s: warm-up from lr/warmup_steps (not 0: a wasted step)
    to lr, cosine down to min_lr on the last step."""
    trainer = make_trainer(runtime, tmp_path, "train.aux_lm_weight=0.5", NO_END_SAVE)
    applied = []
    for opt in trainer.optimizer.chained_optimizers:
        def spy(real=opt.step_with_ready_grads, opt=opt):
            applied.append(opt.param_groups[0]["lr"])
            return real()
        opt.step_with_ready_grads = spy
    history = trainer.fit()
    assert [r["lr"] for r in history] == applied
    assert applied[:2] == [5e-3, 1e-2] and applied[-1] == pytest.approx(1e-3)
    # MFU counts the auxiliary loss's LM head (vocab 64, hidden 32) with the backbone
    m = trainer.cfg.model
    backbone = dense_flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                                     m.num_query_groups)
    assert trainer._dense_flops == backbone + 3 * 2 * 32 * 64


def _megatron_step(self):
    """The optimizer step as megatron's own step() takes it (the norm computed again inside)."""
    import math

    found_inf = self.optimizer.prepare_grads()
    grad_norm = self.optimizer.get_grad_norm()
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm
    ok, clipped, _ = self.optimizer.step()
    return bool(ok), grad_norm if clipped is None else clipped


@pytest.mark.parametrize("clip", ["0.05", "0"])  # 0.05: every step is clipped (norms are about 1)
def test_one_gradient_norm_per_step_and_the_same_training_as_megatrons_step(runtime, tmp_path, monkeypatch, clip):
    """Each norm is an all-reduce and a host sync: computed once, used for the decision and the
    clipping; the weights and losses are bit for bit those of megatron's own step()."""
    import megatron.core.optimizer.optimizer as megatron_optimizer

    from engine.trainer import Trainer

    init = tmp_path / "init"
    checkpoint.save(str(init), 0, make_trainer(runtime, tmp_path / "a", "checkpoint.resume=false").model, None,
                    {"step": 0})
    runs = {}
    for name in ("once", "megatron"):
        trainer = make_trainer(runtime, tmp_path / name, "checkpoint.resume=false", f"checkpoint.init_from={init}",
                               f"train.grad_clip={clip}", "train.steps=3", NO_END_SAVE)
        if name == "megatron":
            monkeypatch.setattr(Trainer, "_optimizer_step", _megatron_step)
        calls = []
        real = megatron_optimizer.get_grad_norm_fp32
        monkeypatch.setattr(megatron_optimizer, "get_grad_norm_fp32", lambda *a, **k: calls.append(1) or real(*a, **k))
        history = trainer.fit()
        monkeypatch.undo()
        runs[name] = (history, params(trainer), len(calls))
    (once, p_once, n_once), (ref, p_ref, n_ref) = runs["once"], runs["megatron"]
    assert n_once == 3 and n_ref == 6
    assert [(r["loss"], r["grad_norm"]) for r in once] == [(r["loss"], r["grad_norm"]) for r in ref]
    assert all(torch.equal(a, b) for a, b in zip(p_once, p_ref))
    assert float(clip) < min(r["grad_norm"] for r in once) or float(clip) == 0


def test_throughput_leaves_out_evaluation_and_checkpoint_time(runtime, tmp_path, monkeypatch):
    """A slow evaluation and a slow save (1000 s each on the clock progress reads) between steps: the
    step time stays that of training."""
    import engine.progress

    offset = [0.0]
    monkeypatch.setattr(engine.progress, "time",
                        types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))
    from engine.data import PackedGroups

    held = PackedGroups(random_groups(4, 8, 64, 64), 64)  # not evaluated (slow_evaluate), but recorded by each save
    trainer = make_trainer(runtime, tmp_path, "checkpoint.resume=false", "train.eval_interval=1",
                           "checkpoint.save_interval=1", evals={"held_out": held})

    def slow_evaluate(data):
        offset[0] += 1000.0
        return {"loss": 0.5, "pair_accuracy": 0.5, "pairs": 1}

    def slow_save(real=trainer.save):
        offset[0] += 1000.0
        return real()

    trainer.evaluate = slow_evaluate
    trainer.save = slow_save
    rows = [r for r in trainer.fit() if "eval" not in r]
    assert offset[0] == 1000.0 * 7  # evaluated after steps 1-3, saved after 1-4
    assert len(rows) == 4 and all(r["step_time_s"] < 100 for r in rows), rows


def test_a_resume_refuses_changed_optimizer_settings_and_an_old_checkpoint_resumes(runtime, tmp_path):
    make_trainer(runtime, tmp_path, "train.exit_at_step=2").fit()
    step = checkpoint.latest(str(tmp_path / "checkpoints"))
    assert step.endswith("step_00000002")
    with pytest.raises(ConfigError) as err:
        make_trainer(runtime, tmp_path, "train.lr=2e-2", "train.adam_beta1=0.8", "train.steps=6")
    msg = str(err.value)
    for part in ("train.lr=0.01 when saved, 0.02 now", "train.adam_beta1=0.9 when saved, 0.8 now",
                 "train.steps=4 when saved, 6 now", f"checkpoint.init_from={step}"):
        assert part in msg, msg
    # a checkpoint written before the settings were recorded resumes as before
    state_file = tmp_path / "checkpoints" / "step_00000002" / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["settings"]
    state["loader"] = {"consumed_batches": state["loader"]["consumed_batches"]}
    state_file.write_text(json.dumps(state))
    resumed = make_trainer(runtime, tmp_path)
    assert resumed.step == 2 and [r["step"] for r in resumed.fit()] == [1, 2, 3, 4]


def test_a_resume_refuses_a_changed_loss(runtime, tmp_path):
    """The loss decides what the steps optimise: a requeued job whose config switched it went on
    silently with another objective, its logged loss no longer comparable with the rows before."""
    make_trainer(runtime, tmp_path, "train.exit_at_step=2", "train.aux_lm_weight=0.5").fit()
    step = checkpoint.latest(str(tmp_path / "checkpoints"))
    with pytest.raises(ConfigError) as err:
        make_trainer(runtime, tmp_path, "train.loss=infonce", "train.aux_lm_weight=0.2")
    msg = str(err.value)
    for part in ("train.loss=pairwise when saved, infonce now", "train.aux_lm_weight=0.5 when saved, 0.2 now",
                 f"checkpoint.init_from={step}"):
        assert part in msg, msg
    assert make_trainer(runtime, tmp_path, "train.aux_lm_weight=0.5", "train.grad_clip=0.5").step == 2


def test_a_resume_says_that_a_checkpoint_to_initialise_from_is_not_loaded(runtime, tmp_path):
    """Another base model named in checkpoint.init_from, same shape and data, same run_dir (a second
    fine-tuning, say): the run went on with the first one's weights without a word."""
    make_trainer(runtime, tmp_path / "base", "train.exit_at_step=1").fit()
    make_trainer(runtime, tmp_path / "run", "train.exit_at_step=2").fit()
    lines = []
    resumed = make_trainer(runtime, tmp_path / "run", f"checkpoint.init_from={tmp_path / 'base'}",
                           log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert resumed.step == 2
    assert any(f"checkpoint.init_from={tmp_path / 'base'} is not loaded: the run resumes" in x for x in lines), lines


def test_the_time_limit_stops_within_one_step_and_logs_the_partial_window(runtime, tmp_path):
    """train.time_limit_s is checked every step, not only on logged ones: a run sized to a job slot
    must not overshoot by up to log.interval - 1 steps. The stop step gets a row and a checkpoint."""
    trainer = make_trainer(runtime, tmp_path, "train.time_limit_s=1e-6", "log.interval=100",
                           "checkpoint.save_interval=0")
    history = trainer.fit()
    assert [r["step"] for r in history] == [1]
    assert history[0]["loss"] > 0
    assert checkpoint.latest(str(tmp_path / "checkpoints")).endswith("step_00000001")


def test_the_time_limit_ignores_the_wall_clock_being_set(runtime, tmp_path, monkeypatch):
    """NTP stepping the wall clock forward a day mid-run stopped a 1000 s time limit at once (and one
    stepped back let a run overrun its slot and be killed unsaved): the limit reads the steady clock."""
    import engine.stop_agreement

    jumps = iter([0.0])  # the trainer's first read (fit's start) is the real time, every later one a day on
    clock = types.SimpleNamespace(time=lambda: time.time() + next(jumps, 86400.0), monotonic=time.monotonic)
    monkeypatch.setattr(engine.stop_agreement, "time", clock)
    trainer = make_trainer(runtime, tmp_path, "train.time_limit_s=1000", "log.interval=100",
                           "checkpoint.save_interval=0", NO_END_SAVE)
    history = trainer.fit()
    assert [r["step"] for r in history] == [4] and trainer.stopped_by == "", (history, trainer.stopped_by)


def test_a_stop_file_stops_after_the_step_that_found_it_saves_and_is_answered(runtime, tmp_path):
    """train.stop_file (a scheduler's warning turned into a file): the run saves at the step that
    found it and exits; the file is removed once the checkpoint is complete, so the same command
    resumes and trains to the end instead of stopping again (the losses against an uninterrupted
    run, over two ranks: tests/engine/test_parallel_resume.py)."""
    stop = tmp_path / "STOP"
    lines = []
    trainer = make_trainer(runtime, tmp_path / "a", f"train.stop_file={stop}", "log.interval=100")
    trainer.log = lambda *a, **k: lines.append(" ".join(map(str, a)))
    stop.touch()
    assert [r["step"] for r in trainer.fit()] == [1] and trainer.stopped_by == "stop_file"
    assert checkpoint.latest(str(tmp_path / "a" / "checkpoints")).endswith("step_00000001")
    assert not stop.exists() and any(f"train.stop_file {stop} found at step 1" in x for x in lines), lines
    assert any(f"train.stop_file {stop} exists already" in x for x in lines), lines
    resumed = make_trainer(runtime, tmp_path / "a", f"train.stop_file={stop}")
    assert resumed.step == 1 and [r["step"] for r in resumed.fit()] == [1, 2, 3, 4] and resumed.stopped_by == ""


def test_a_stop_file_found_at_the_step_the_time_limit_ends_is_still_answered(runtime, tmp_path):
    """Both stops at one step (a time limit reached while the scheduler's warning came): the stop
    file is answered, removed once saved, so the SLURM script requeues the job; as a time-limit stop
    the file stayed, and a job stopped early with a checkpoint was left unrequeued."""
    stop = tmp_path / "STOP"
    trainer = make_trainer(runtime, tmp_path / "a", f"train.stop_file={stop}", "train.time_limit_s=1e-6",
                           "log.interval=100")
    stop.touch()
    assert [r["step"] for r in trainer.fit()] == [1] and trainer.stopped_by == "stop_file"
    assert checkpoint.latest(str(tmp_path / "a" / "checkpoints")).endswith("step_00000001")
    assert not stop.exists()


@pytest.mark.parametrize("damaged", ["*.distcp", ".metadata"])
def test_a_damaged_newest_checkpoint_is_named_with_the_step_to_resume_from(runtime, tmp_path, damaged):
    """A truncated shard file (or torch's .metadata) in the newest complete step was a torch
    CheckpointException (a BaseException, past `except Exception`) or an AssertionError, naming
    neither the step nor what to do."""
    make_trainer(runtime, tmp_path, "checkpoint.save_interval=1", "train.exit_at_step=3",
                 "train.aux_lm_weight=0").fit()
    ckpts = tmp_path / "checkpoints"
    shard = next((ckpts / "step_00000003").glob(damaged))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(ConfigError) as err:
        make_trainer(runtime, tmp_path, "train.aux_lm_weight=0")
    msg = str(err.value)
    assert f"move {ckpts / 'step_00000003'} out of {ckpts}" in msg and str(ckpts / "step_00000002") in msg, msg
    (ckpts / "step_00000003").rename(tmp_path / "damaged")  # what the message says: resumes from step 2
    assert make_trainer(runtime, tmp_path, "train.aux_lm_weight=0").step == 2


def test_a_resume_names_the_save_that_did_not_finish(runtime, tmp_path):
    """Killed mid-save: the run resumes from the newest complete step and says which save it ignored."""
    from engine.data import PackedGroups
    from engine.trainer import Trainer
    from tests.engine.dist_worker import random_groups

    make_trainer(runtime, tmp_path, "train.exit_at_step=2").fit()
    (tmp_path / "checkpoints" / "step_00000003.partial").mkdir()
    lines = []
    cfg = load_config(EngineConfig, None, SMALL + [f"run_dir={tmp_path}"])
    trainer = Trainer(cfg, runtime, PackedGroups(random_groups(3, 40, 64, 64), 64), str(tmp_path), pad_id=0,
                      log=lines.append)
    assert trainer.step == 2
    assert any("step_00000002 at step 2" in line and "step_00000003.partial" in line for line in lines), lines


def test_a_weights_only_step_in_the_checkpoint_directory_says_to_use_init_from(runtime, tmp_path):
    """checkpoint.dir pointed at a converted model (weights only): a KeyError 'loader' traceback."""
    weights = tmp_path / "converted"
    checkpoint.save(str(weights), 0, make_trainer(runtime, tmp_path / "a", "checkpoint.resume=false").model, None,
                    {"step": 0})
    with pytest.raises(ConfigError, match=f"holds weights only.*checkpoint.init_from={weights / 'step_00000000'}"):
        make_trainer(runtime, tmp_path / "b", f"checkpoint.dir={weights}")


def test_an_unwritable_checkpoint_directory_is_refused_before_training(runtime, tmp_path):
    """It failed at the first save, after checkpoint.save_interval steps of training."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=f"checkpoint directory {tmp_path / 'a_file' / 'ckpt'} is not writable"):
        make_trainer(runtime, tmp_path, f"checkpoint.dir={tmp_path / 'a_file' / 'ckpt'}")


def test_a_failed_save_keeps_the_step_it_replaces_and_says_what_was_kept(runtime, tmp_path, monkeypatch):
    """Saving a step that exists (a resume from before it) deleted the complete one when the save
    began, so a save cut short (a full disk) lost it; the error now names the checkpoints kept."""
    import errno

    from megatron.core import dist_checkpointing

    make_trainer(runtime, tmp_path, "checkpoint.save_interval=1", "checkpoint.keep=0", "train.exit_at_step=3").fit()
    ckpts = tmp_path / "checkpoints"
    (ckpts / checkpoint.LATEST).write_text("step_00000002")  # rolled back to step 2: step 3 is saved again
    trainer = make_trainer(runtime, tmp_path, "checkpoint.save_interval=1", "checkpoint.keep=0")
    assert trainer.step == 2

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dist_checkpointing, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "No space left on device" in msg and str(ckpts / "step_00000003.partial") in msg, msg
    assert f"newest: {ckpts / 'step_00000002'}" in msg and "run the same command again" in msg, msg
    assert checkpoint.read_state(str(ckpts / "step_00000003"))["step"] == 3


def test_an_exit_step_behind_a_resume_is_reported_and_the_run_trains_on(runtime, tmp_path):
    make_trainer(runtime, tmp_path, "train.exit_at_step=2").fit()
    again = make_trainer(runtime, tmp_path, "train.exit_at_step=2")  # a requeued job's same command
    lines = []
    again.log = lambda *a, **k: lines.append(" ".join(map(str, a)))
    again.fit()
    assert again.step == 4
    assert any("train.exit_at_step=2 is not after the resumed step 2: it has no effect" in x for x in lines), lines


def test_save_at_end_false_writes_no_final_checkpoint_but_an_early_stop_still_saves(runtime, tmp_path):
    make_trainer(runtime, tmp_path / "a", "checkpoint.save_at_end=false").fit()
    assert checkpoint.latest(str(tmp_path / "a" / "checkpoints")) is None
    make_trainer(runtime, tmp_path / "b", "checkpoint.save_at_end=false", "train.exit_at_step=2").fit()
    assert checkpoint.latest(str(tmp_path / "b" / "checkpoints")).endswith("step_00000002")  # resumable


def test_the_sharding_integrity_check_runs_at_a_runs_first_save_only(runtime, tmp_path, monkeypatch):
    """megatron's check gathers every rank's shard metadata on every rank at each save (seconds per
    save at hundreds of ranks); the layout does not change within a run, so the first save checks."""
    from megatron.core.dist_checkpointing import state_dict_utils

    calls = []
    real = state_dict_utils.validate_sharding_integrity
    monkeypatch.setattr(state_dict_utils, "validate_sharding_integrity",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = make_trainer(runtime, tmp_path, "checkpoint.save_interval=1", "train.steps=3")
    trainer.fit()
    assert len(calls) == 1 and len(list((tmp_path / "checkpoints").glob("step_*"))) == 2  # keep=2 of 3 saves


def test_a_dp_reshardable_state_in_other_gradient_buckets_is_refused_before_the_load(runtime, tmp_path):
    """megatron writes a dp_reshardable state bucket by bucket, and sizes the buckets from
    parallel.overlap_grad_reduce and the data-parallel size (above 40 replicas): a resume whose
    buckets differ was an assertion deep inside the load."""
    fmt = "checkpoint.optimizer_format=dp_reshardable"
    first = make_trainer(runtime, tmp_path, fmt, "train.exit_at_step=2")
    first.fit()
    state_file = Path(checkpoint.latest(str(tmp_path / "checkpoints"))) / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["optimizer_buckets"] == resume_checks.optimizer_buckets(first.optimizer) != []
    assert make_trainer(runtime, tmp_path, fmt).step == 2  # the same buckets: resumes
    state["optimizer_buckets"] = [[7, 11]]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"gradient buckets of \[\[7, 11\]\] elements.*overlap_grad_reduce"):
        make_trainer(runtime, tmp_path, fmt)


def test_a_stop_file_skips_the_evaluation_due_at_its_step(runtime, tmp_path):
    from engine.data import PackedGroups

    stop = tmp_path / "STOP"
    stop.touch()
    held = PackedGroups(random_groups(5, 10, 64, 64), 64)
    history = make_trainer(runtime, tmp_path, f"train.stop_file={stop}", "train.eval_interval=1",
                           evals={"held": held}).fit()
    assert [r["step"] for r in history] == [1] and not any("eval" in r for r in history), history
    # without the file the same settings evaluate at step 1
    again = make_trainer(runtime, tmp_path / "b", "train.eval_interval=1", NO_END_SAVE, evals={"held": held}).fit()
    assert any(r.get("eval") == "held" and r["step"] == 1 for r in again), again


@pytest.mark.parametrize("saved", [True, False])
def test_a_changed_distributed_optimizer_is_refused_and_an_unrecorded_one_is_not_called_damaged(runtime, tmp_path,
                                                                                                  saved):
    """parallel.distributed_optimizer changed on resume (the default optimizer format): refused before the
    load, naming it. A step saved before the setting was recorded resumes unchanged, and changed it fails
    in the load without calling the files damaged (the advice was to move a good checkpoint away)."""
    def trainer(now):
        return make_trainer(runtime, tmp_path, f"parallel.distributed_optimizer={str(now).lower()}")

    make_trainer(runtime, tmp_path, "train.exit_at_step=2",
                 f"parallel.distributed_optimizer={str(saved).lower()}").fit()
    step = checkpoint.latest(str(tmp_path / "checkpoints"))
    with pytest.raises(ConfigError) as err:
        trainer(not saved)
    assert f"parallel.distributed_optimizer={str(saved).lower()} when saved" in str(err.value), str(err.value)
    state_file = Path(step) / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["distributed_optimizer"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError) as err:
        trainer(not saved)
    msg = str(err.value)
    assert "saved with other settings" in msg and "damaged after" not in msg and "move" not in msg, msg
    assert trainer(saved).step == 2


def _scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every `tag` scalar written into tb_dir, in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_a_log_window_of_skipped_steps_only_shows_no_loss_or_accuracy(runtime, tmp_path, capsys):
    """Every step of the window skipped as non-finite: nothing was counted, and 'loss 0.0000 | pair acc 0.000'
    (TensorBoard's train/loss 0.0, a history row's 0) read as a perfect model. The skipped batch trained
    nothing: it stays out of the tokens/s."""
    from engine.nonfinite_steps import NonFiniteError

    trainer = make_trainer(runtime, tmp_path, "train.lr=1e35", "train.warmup_steps=0", "train.max_nonfinite_steps=2",
                           "log.tensorboard=true")
    with pytest.raises(NonFiniteError):
        trainer.fit()
    first, skipped = trainer.history
    assert first["step"] == 1 and "loss" in first and "pair_acc" in first and first["tokens_per_s"] > 0
    assert skipped["step"] == 2 and skipped["skipped_steps"] == 1, skipped
    assert "loss" not in skipped and "pair_acc" not in skipped and skipped["tokens_per_s"] == 0, skipped
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step      2/4"))
    assert "loss n/a | pair acc n/a" in line, line
    assert [s for s, _ in _scalars(tmp_path / "tensorboard", "train/loss")] == [1]
    assert [s for s, _ in _scalars(tmp_path / "tensorboard", "train/pair_acc")] == [1]


def test_tensorboard_shows_each_step_once_after_a_resume_from_before_the_last_logged_step(runtime, tmp_path):
    """A run killed after step 3 with its newest checkpoint at step 2 (steps 3 and 4 logged, the save at
    4 never made) resumes from 2 and logs 3 and 4 again: TensorBoard showed them twice."""
    make_trainer(runtime, tmp_path, "train.steps=4", "checkpoint.save_interval=2", "log.tensorboard=true").fit()
    ckpt = tmp_path / "checkpoints"
    shutil.rmtree(ckpt / "step_00000004")
    (ckpt / checkpoint.LATEST).write_text("step_00000002")
    resumed = make_trainer(runtime, tmp_path, "train.steps=4", "checkpoint.save_interval=2", "log.tensorboard=true")
    assert resumed.step == 2
    resumed.fit()
    for tag in ("train/loss", "train/lr"):
        assert [s for s, _ in _scalars(tmp_path / "tensorboard", tag)] == [1, 2, 3, 4], tag


def test_the_training_line_of_a_resumed_run_says_which_steps_are_left(runtime, tmp_path):
    """Resumed at 30 of 30 the line said '30 steps of 4 packed sequences', then trained nothing."""
    def banner(*overrides):
        lines = []
        make_trainer(runtime, tmp_path, *overrides, log=lambda *a, **k: lines.append(" ".join(map(str, a)))).fit()
        return next(x for x in lines if x.startswith("training "))

    assert "| 4 steps of 4 packed sequences x 64 tokens |" in banner("train.exit_at_step=2")
    assert "| steps 3-4 of 4 (2 left) of 4 packed sequences x 64 tokens |" in banner("train.exit_at_step=3")
    assert "| step 4 of 4 (1 left) of 4 packed sequences x 64 tokens |" in banner()
    line = banner()
    assert "| nothing left to train (step 4 of 4) |" in line and "steps of" not in line, line


def test_a_resume_names_a_changed_data_setting(runtime, tmp_path):
    """data.packing=ordered on resume was refused as 'the data order changed ... digest', naming no
    setting. A step saved before the data settings were recorded resumes as before."""
    make_trainer(runtime, tmp_path, "train.exit_at_step=2").fit()
    step = checkpoint.latest(str(tmp_path / "checkpoints"))
    with pytest.raises(ConfigError) as err:
        make_trainer(runtime, tmp_path, "data.packing=ordered")
    assert "data.packing=best_fit when saved, ordered now" in str(err.value), str(err.value)
    state_file = Path(step) / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["data_settings"]
    state_file.write_text(json.dumps(state))
    assert make_trainer(runtime, tmp_path, "data.packing=ordered").step == 2
