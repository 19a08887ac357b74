"""The start-up checks a training run makes before any process group or data: against this machine
(check_machine), the directories it will write into (unwritable_before_launch), and the checkpoints it
resumes or starts from (newest_checkpoint, resume_on_restart, model_from_checkpoint, check_checkpoints).

Called by the entry scripts' start-up (engine/pretrain.py's _main and check_before_launch, which
engine/finetune.py runs too), and by polar's fine-tuning recipe and `polar plan`, which find the step
a run resumes from and the model it builds as the run does. The checks that need the recipe's data
and its tokenizer (engine.pretrain.prepare_checked_data, check_resume_data) stay in the entry script:
this module, like every engine/ module but the entry scripts, does not import polar.
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.config import ConfigError


def check_machine(cfg) -> None:
    """Settings this machine cannot run at all (Transformer Engine or an FP8 recipe without the GPU
    for it, Triton or CUDA kernels without a GPU), checked before any checkpoint is compared: a
    resumed step recorded with other settings would otherwise be reported first, with the advice to
    set them back, which cannot help while this machine refuses them (build_model checks again on
    the device the run is given)."""
    import torch

    from engine import profiling
    from engine.fp8 import check_start_up
    from engine.parallelize import check_kernels
    from engine.runtime import world_size_from_env

    check_start_up(cfg.model, cfg.parallel, cfg.train)
    check_kernels(cfg.train, torch.cuda.is_available(), cfg.model.hidden_size // cfg.model.num_attention_heads)
    profiling.check_start_up(cfg.train, world_size_from_env(), torch.cuda.is_available())


def unwritable_before_launch(directory: str) -> str:
    """The error's text where the run could not write into `directory` (engine.checkpoint.unwritable, which
    engine.pretrain.run asks once the process groups are up), else '': found without creating anything, by a file
    without a name (O_TMPFILE, or one removed at once where the file system lacks it) opened in the
    directory, or in the nearest one above it that exists where it does not exist yet."""
    import errno
    import tempfile

    from engine.checkpoint_request import first_line

    existing = Path(directory)
    try:
        existing = existing.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():  # a file in the path: mkdir fails with this
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:  # named as the run's own mkdir names it, not by the temporary file's random name
        return first_line(type(e)(e.errno, e.strerror, str(directory)) if e.errno else e)
    return ""


def newest_checkpoint(cfg) -> str | None:
    """engine.checkpoint.latest of the run's checkpoint directory, which every rank looks into at
    start-up, before any process group: a `latest` or a step's state file the run may not read is a
    config error naming the directory and the file system's error (each rank finds the same one)."""
    from engine import checkpoint
    from engine.checkpoint_request import first_line

    ckpt_dir = checkpoint.run_checkpoint_dir(cfg)
    try:
        return checkpoint.latest(ckpt_dir)
    except OSError as e:
        raise ConfigError(f"{ckpt_dir}: the newest checkpoint could not be looked for ({first_line(e)}); make the "
                          "checkpoint directory and its files readable by the run, then run it again") from None


# set in a restarted job's processes: by torchrun (--max-restarts) and by SLURM (a requeued job)
RESTART_COUNTS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def resume_on_restart(cfg, env=None) -> str:
    """checkpoint.resume=false guards a new run's first start (check_checkpoints refuses a directory
    holding checkpoints). A restart of the same job (torchrun's --max-restarts, SLURM's requeue) finds
    the checkpoints that job wrote since that start: refusing them ended, at start-up, the very job the
    restart was there to keep going. It resumes from them where the newest was written by this job
    (its job ids, engine.checkpoint.job_identity; a first start refused for another run's checkpoints
    is restarted by torchrun too, and must still be refused); -> the note saying so ("" otherwise)."""
    from engine import checkpoint

    env = os.environ if env is None else env
    restarts = [f"{k}={env[k]}" for k in RESTART_COUNTS if env.get(k, "").strip().isdigit() and int(env[k]) > 0]
    if cfg.checkpoint.resume or not restarts:
        return ""
    found = newest_checkpoint(cfg)
    mine = checkpoint.job_identity(env)
    if not found or not mine or checkpoint.read_state(found).get("job") != mine:
        return ""
    cfg.checkpoint.resume = True
    return (f"note: checkpoint.resume=false holds for the run's first start; this is a restart of the same job "
            f"({', '.join(restarts)}; {found} was written by it), which resumes from its checkpoints")


def model_from_checkpoint(cfg, sources: dict) -> str:
    """A run that loads a checkpoint (the step it resumes from, else checkpoint.init_from) builds the
    model that checkpoint holds: every model.* setting recorded with it (engine.checkpoint_model.
    saved_model_settings) that the user did not set, in a --config file of theirs or on the command
    line (a preset's or the default's value is no choice of theirs), is taken from it, as loading a
    pretrained model brings its architecture elsewhere. The RoPE and norm settings come too: they
    are the function the weights were trained to compute (a converted Qwen2 checkpoint's
    rotary_base=1e6, say), which the defaults would silently change. A setting the user gave is kept
    and checked against the checkpoint (check_checkpoints). -> the line naming the settings that
    changed ("" when none did; a resume's model.vocab_size=0 given the size recorded is no change)."""
    import dataclasses

    from engine import checkpoint, checkpoint_model
    from engine.config_load import set_by_user, updated

    step = newest_checkpoint(cfg) if cfg.checkpoint.resume else None
    resuming = step is not None
    if step is None and cfg.checkpoint.init_from:
        step = checkpoint.resolve(cfg.checkpoint.init_from)
    found = checkpoint_model.saved_model_settings(step) if step else None
    if found is None:
        return ""
    saved, where = found
    names = {f.name for f in dataclasses.fields(cfg.model)}
    taken = {k: v for k, v in saved.items() if k in names and not set_by_user(sources, f"model.{k}")}
    if taken.get("vocab_size") == 0:  # recorded as "the tokenizer's": the run's recipe decides, as it did then
        del taken["vocab_size"]
    try:
        model = updated(cfg.model, taken, "model")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    changed = [k for k in taken if getattr(model, k) != getattr(cfg.model, k)]
    if resuming and cfg.model.vocab_size == 0 and "vocab_size" in changed:
        # 0 is no size but "the tokenizer's": the size recorded is the one the run resolved it to (or was
        # given) and has trained with, and its tokenizer is the one the steps were trained with
        # (engine.pretrain.check_resume_data), so taking it changes nothing; said on every resume, it read as a change
        changed.remove("vocab_size")
    cfg.model = model
    if not changed:
        return ""
    return (f"model settings from {where}: {', '.join(f'model.{k}={getattr(model, k)}' for k in changed)} "
            "(a model.* setting given in a --config file or on the command line is kept)")


def check_checkpoints(cfg, derived=()) -> None:
    """The checkpoints a run will load must hold a model of the run's shape, and a resumed run the
    model (shapes and what they compute: RoPE, norms) and the optimizer, schedule, loss and data-order
    settings it was saved with (those in `derived`, set by the recipe from its data, are checked once
    known, by the trainer). A fresh run needs a checkpoint directory of its own: its steps among
    another run's would be pruned and resumed by step number."""
    from engine import checkpoint, checkpoint_load, checkpoint_model, resume_checks

    ckpt_dir = checkpoint.run_checkpoint_dir(cfg)
    found = newest_checkpoint(cfg)
    if found and not cfg.checkpoint.resume:
        raise ConfigError(f"checkpoint.resume=false, but {ckpt_dir} already holds checkpoints (newest {found}): a new "
                          f"run needs a checkpoint directory of its own; pick a new run_dir or checkpoint.dir (with "
                          f"checkpoint.init_from={found} to start from its weights), or remove them")
    if found:
        # the user may have meant a new run (pre-training from an imported checkpoint with the default
        # run_dir, say): setting the model back is only one way out
        new_run = ", or start a new run (a new run_dir=..., or checkpoint.dir=...)"
        if cfg.checkpoint.init_from:
            new_run += (f". checkpoint.init_from={cfg.checkpoint.init_from} is not loaded: a resume from the run's "
                        f"checkpoints ({ckpt_dir}) takes precedence over it")
        checkpoint_model.check_model_matches(cfg.model, found, f"{found}, the step this run resumes from "
                                                               "(checkpoint.resume=true),", otherwise=new_run,
                                             fields=checkpoint_model.SHAPE_FIELDS + checkpoint_model.FUNCTION_FIELDS)
        state = checkpoint.read_state(found)
        resume_checks.check_resume_layout(found, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, state=state,
                                          distributed_optimizer=cfg.parallel.distributed_optimizer)
        resume_checks.check_resume_settings(found, cfg.train, skip=derived, state=state)
        if cfg.train.aux_lm_weight > 0 and not checkpoint_load.has_lm_head(found):
            raise ConfigError(f"train.aux_lm_weight={cfg.train.aux_lm_weight}: the run resumes from {found}, "
                              "saved without an LM head (train.aux_lm_weight=0), and resuming keeps the "
                              "settings it was saved with; set train.aux_lm_weight=0, or start a new run "
                              "directory with checkpoint.init_from (the head then starts fresh)")
        return  # resuming wins over init_from
    if cfg.checkpoint.init_from:
        step = checkpoint.resolve(cfg.checkpoint.init_from)
        checkpoint_model.check_model_matches(cfg.model, step, f"checkpoint.init_from={step}")
