#!/usr/bin/env python3
"""POLAR pre-training entry point.

    torchrun --nproc_per_node 2 engine/pretrain.py                      # the embedded CPU default
    torchrun --nproc_per_node 8 engine/pretrain.py --config polar_1_8b parallel.tp=2
    torchrun --nproc_per_node 8 engine/pretrain.py data.path=ds/ data.eval_path=ds_eval/ data.seq_length=16384

With no arguments it builds its own data (synthetic policies, byte-level tokenizer), trains a
tiny reward model, evaluates pairwise accuracy on held-out and seen policies next to non-learned
baselines, and writes `summary.json` and a checkpoint into the run directory. With data.path it
trains on a dataset built by `polar data build` instead (pad id from its metadata, and the
vocabulary size too where model.vocab_size=0; a larger one is kept) and evaluates on data.eval_path
if given (one built dataset, or several named: data.eval_path=base=ds_base/,chat=ds_chat/).

This script is where the engine (model, parallelism, loop) meets the POLAR recipe
(polar/pretrain_recipe.py: the data and the summary). Every setting is checked before any process
group or data is built; what only the data can show (a group longer than data.seq_length, say) is
found once the ranks read it. Either way a bad one stops every rank with one `config error:` line
and exit code 2 (`--check-config` runs both checks before a launch).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import ConfigError  # noqa: E402
from engine.config_load import dump_yaml, load_config  # noqa: E402
from engine.near_miss import unrecognized  # noqa: E402
from engine.rank_stop import stop_alike  # noqa: E402
from engine.run_lock import hold_checkpoint_dir, refuse_a_held_checkpoint_dir  # noqa: E402
from engine.start_checks import (check_checkpoints, check_machine, model_from_checkpoint,  # noqa: E402
                                 newest_checkpoint, resume_on_restart, unwritable_before_launch)
from engine.stop_signal import repeat_s  # noqa: E402

EXIT_FAILED, EXIT_CONFIG, EXIT_NONFINITE = 1, 2, 3


def _notes(e: BaseException) -> str:
    """The lines added to an error on its way up, each on a line of its own after the message (the
    trainer notes which checkpoint a run stopped mid-save kept: engine.trainer.Trainer.fit)."""
    return "".join(f"\n{note}" for note in getattr(e, "__notes__", ()))


def parse_args(argv=None, prog: str | None = None, description: str = "POLAR reward-model pre-training "
               "(run under torchrun; a plain single process works too).",
               config_help: str = "a preset name (tiny_cpu, polar_1_8b, polar_7b) or a YAML file (default: "
               "tiny_cpu)"):
    """`prog`: the program's name in its usage and errors, default how it was called (engine.called_as)."""
    from engine.called_as import called_as

    ap = argparse.ArgumentParser(
        prog=called_as("engine.pretrain", prog), description=description,
        epilog="Overrides: section.key=value, e.g. train.lr=1e-4 parallel.tp=2 model.num_layers=8",
    )
    options = [
        ap.add_argument("--config", default=None, help=config_help),
        ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit"),
        ap.add_argument("--check-config", action="store_true",
                        help="run the start-up checks for WORLD_SIZE processes (default 1), the kernel choice and "
                             "the data, and exit: 0 when the run would start, 2 with the config error otherwise "
                             "(what `polar pretrain` and `polar finetune --nproc N` do before launching torchrun)"),
    ]
    ap.add_argument("overrides", nargs="*", help="section.key=value settings")
    args, unknown = ap.parse_known_intermixed_args(argv)  # settings before and after --config alike
    if unknown:
        ap.error(unrecognized(unknown, ["--help", *(s for a in options for s in a.option_strings)]))
    return args


def main(argv=None, recipe=None, prog: str | None = None) -> int:
    """Parses the command line, checks every setting, runs; `recipe` defaults to pre-training, `prog`
    (the name in the usage and errors) to how this entry was called (engine.called_as)."""
    try:
        code = _main(argv, recipe, prog)
        sys.stdout.flush()  # a short output is still buffered here: its broken pipe is this one's too
        return code
    except BrokenPipeError:  # `--print-config | head -1`, `--help | head`: the reader left
        from engine.closed_pipe import reader_gone

        return reader_gone()


def _main(argv=None, recipe=None, prog=None) -> int:
    if recipe is None:
        from polar import pretrain_recipe as recipe
    args = parse_args(argv, prog, **getattr(recipe, "CLI", {}))
    from engine.quiet import silence_known_warnings

    silence_known_warnings()  # before megatron is imported: some of its warnings come at import
    rank = int(os.environ.get("RANK", "0"))
    try:
        from polar.presets import resolve_config

        name = args.config or recipe.DEFAULT_PRESET
        sources: dict = {}
        cfg = load_config(recipe.CONFIG_CLASS, resolve_config(name) if name else None, args.overrides,
                          check=not args.print_config, sources=sources)
        if args.print_config:  # the resolved settings, before the checks that need this machine's layout
            try:
                taken = model_from_checkpoint(cfg, sources)
            except (ConfigError, OSError):  # unchecked here: the run names what is wrong with the checkpoint
                taken = ""
            if rank == 0:
                print((f"# {taken}\n" if taken else "") + dump_yaml(cfg))
            return 0
        refuse_a_held_checkpoint_dir(cfg, rank)  # before the checks read what another run may be writing
        from engine.cuda_env import order_tp_launches

        order_tp_launches(cfg.parallel.tp)  # before the first CUDA call (check_machine makes one)
        restarted = resume_on_restart(cfg)  # first: whether the run resumes decides which checkpoint it loads
        taken = model_from_checkpoint(cfg, sources)
        for line in (restarted, taken):
            if line and rank == 0 and first_said(line):
                print(line, flush=True)
        check_machine(cfg)
        repeat_s()  # $POLAR_SIGTERM_REPEAT_S, which fit reads: a bad value refused here, before the launch
        recipe.check(cfg)
        check_checkpoints(cfg, derived=getattr(recipe, "DERIVED_SETTINGS", ()))
        from engine.runtime import validate_layout, world_size_from_env

        validate_layout(cfg.model, cfg.parallel, cfg.train, world_size_from_env(), cfg.data.seq_length)
        if args.check_config:
            check_before_launch(cfg, recipe)
            if rank == 0:
                warning = schedule_warning(cfg.train, getattr(recipe, "DERIVED_SETTINGS", {}))
                if warning and first_said(warning):
                    print(warning, flush=True)
                print(f"config ok: the settings, kernels and data pass the start-up checks for "
                      f"{world_size_from_env()} process(es)", flush=True)
            return 0
    except ConfigError as e:
        return stop_alike(rank, f"config error: {e}", EXIT_CONFIG)
    from engine.checkpoint import CheckpointWriteError
    from engine.runtime import released_on_error
    from engine.shard_format import DatasetFormatError, DatasetTokenError
    from engine.nonfinite_steps import NonFiniteError

    # an error raised inside the run ends the groups it started, once its message is printed
    with released_on_error():
        try:
            return run(cfg, recipe)
        except ConfigError as e:  # found once the data is read (a group longer than the packed length, say)
            return stop_alike(rank, f"config error: {e}{_notes(e)}", EXIT_CONFIG)
        except DatasetFormatError as e:
            # A damaged packed sequence, found by the rank that read it (each rank reads its own share,
            # so it is printed here, not by rank 0 alone).
            # polar data stats and --check-config check the index, not the tokens: an id outside the vocabulary
            # is found only as it is read
            check = "" if isinstance(e, DatasetTokenError) else ("; `polar data stats PATH` (or --check-config) "
                                                                 "checks every shard")
            print(f"data error on rank {rank}: {e}{check}{_notes(e)}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        except NonFiniteError as e:
            return stop_alike(rank, f"error: {e}{_notes(e)}", EXIT_NONFINITE)
        except CheckpointWriteError as e:  # raised on every rank; names the checkpoint, those kept, what to do
            return stop_alike(rank, f"error: {e}{_notes(e)}", EXIT_FAILED)


def first_said(text: str) -> bool:
    """Whether a start-up line (the model settings taken from a checkpoint, a restart's resume, the warm-up
    warning, a recipe's notes on its data) is to be printed: not where polar's launch (`polar pretrain`,
    `polar finetune`) printed the same text already, from its start-up check (a process of its own) or an
    earlier start of the run that torchrun restarted (polar printed each line twice). A line the check
    did not print is said: a restart's resume, found only at run time, went unsaid where the run took
    the launch's check for having said every line. Outside such a launch every line is said."""
    from polar.cli import CHECKED_AT_LAUNCH

    kept = os.environ.get(CHECKED_AT_LAUNCH, "")
    if not (os.path.isabs(kept) and os.path.isfile(kept)):
        return True
    with open(kept, encoding="utf-8") as f:
        if text in f.read().split("\0"):
            return False
    with open(kept, "a", encoding="utf-8") as f:
        f.write(text + "\0")
    return True


def schedule_warning(train, derived=None) -> str:
    """A warm-up as long as the run or longer (a preset's 3000 warm-up steps kept by a shorter
    train.steps, say) never reaches train.lr and never decays: legal, since a smoke run of a few steps
    of a preset means exactly that, but rarely what a real run meant, so said at start-up and by
    --check-config. train.steps=0 (evaluation only) has no schedule. `derived`: the recipe's settings
    set from others (fine-tuning's, DERIVED_SETTINGS), which the advice then names. -> the warning, or ""."""
    if not 0 < train.steps <= train.warmup_steps:
        return ""
    reached = (f"reaches train.lr={train.lr:g} only at the last step" if train.steps == train.warmup_steps else
               f"stops at {train.steps / train.warmup_steps:.0%} of train.lr={train.lr:g}")
    derived = derived or {}
    if "train.warmup_steps" in derived:  # setting train.warmup_steps itself is refused there
        advice = (f"lower {derived['train.warmup_steps']}"
                  + (f" or raise {derived['train.steps']}" if "train.steps" in derived else ""))
    else:
        advice = "set train.warmup_steps below train.steps"
    return (f"warning: train.warmup_steps={train.warmup_steps} >= train.steps={train.steps}: the learning rate "
            f"{reached} and never decays (fine for a smoke run; otherwise {advice})")


def _unwritable_run_dir(run_dir, error: str) -> ConfigError:
    return ConfigError(f"run_dir={run_dir} is not writable ({error}); the run writes its config.yaml and "
                       f"summary.json there: make it writable or set run_dir to a directory that is")


def check_before_launch(cfg, recipe) -> None:
    """What the run itself checks only after torch.distributed starts: the directories it writes into,
    the data (a group longer than data.seq_length, a bad fine-tuning record, a resume whose
    data-derived settings changed). Reading the data costs what the run's own start does."""
    from engine.checkpoint import run_checkpoint_dir, unwritable_checkpoint_dir

    error = unwritable_before_launch(cfg.run_dir)
    if error:
        raise _unwritable_run_dir(cfg.run_dir, error)
    ckpt_dir = run_checkpoint_dir(cfg)
    error = unwritable_before_launch(ckpt_dir)
    if error:
        raise unwritable_checkpoint_dir(ckpt_dir, error)
    data = prepare_checked_data(cfg, recipe)
    # A run checks each packed sequence of a data set on disk as it reads it; before a launch every
    # one is (a damaged index would otherwise stop the run at the step that reads it).
    for name, source in (("data.path", data.train), *((f"evaluation set {k}", v) for k, v in data.evals.items())):
        if hasattr(source, "verify"):
            try:
                source.verify(log=(lambda line: print(line, file=sys.stderr, flush=True))
                              if int(os.environ.get("RANK", "0")) == 0 else None)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from e


def prepare_checked_data(cfg, recipe):
    """The recipe's data, which may settle derived settings (fine-tuning: steps from epochs); a
    resume is then checked against them, naming what the user sets, and against the data itself
    (its order and digests, the tokenizer the checkpoints carry), before anything of the run
    directory is written (config.yaml, the tokenizer): a refused resume leaves it as it was, and
    --check-config refuses what the run would. The trainer checks the loader state again."""
    from engine import resume_checks
    from engine.checkpoint_load import rank0_answer

    seq_length = cfg.data.seq_length
    data = recipe.prepare_data(cfg)
    if cfg.data.seq_length != seq_length:  # set from the data (fine-tuning's data.seq_length=0): checked now
        from engine.runtime import validate_layout, world_size_from_env

        validate_layout(cfg.model, cfg.parallel, cfg.train, world_size_from_env(), cfg.data.seq_length)
    derived = getattr(recipe, "DERIVED_SETTINGS", {})
    # in the run, rank 0 looks (the step every rank then checks against, as the trainer resumes from it)
    resume_from = rank0_answer(lambda: newest_checkpoint(cfg)) if cfg.checkpoint.resume else None
    if resume_from:
        # the data first: a changed data setting also changes what is derived from the data
        # (fine-tuning's steps), and is the one to name
        check_resume_data(cfg, data, resume_from)
        if derived:
            resume_checks.check_resume_settings(resume_from, cfg.train, derived_from=derived)
    return data


def check_resume_data(cfg, data, step_dir) -> None:
    """The data a resumed run reads must be made from the data settings its steps were trained on
    (engine.resume_checks.check_resume_data_settings, which names each that changed: the trainer and
    the pre-training recipe apply the same rule), be that data in the same order
    (engine.data.GlobalBatchLoader.load_state_dict, the backstop for what no setting records), and be
    tokenized by the tokenizer its checkpoints carry. In the run the step's state and tokenizer files
    are read by rank 0 alone (engine.checkpoint_load.rank0_answer), the checks made on every rank."""
    from engine import checkpoint, resume_checks
    from engine.checkpoint_load import loadable_state, rank0_answer
    from engine.data import GlobalBatchLoader
    from polar.checkpoint_tokenizer import DIR, differs_from_saved

    state = rank0_answer(lambda: loadable_state(Path(step_dir)))  # an incomplete copy refused before launch
    resume_checks.check_resume_data_settings(step_dir, resume_checks.data_settings(cfg), state=state,
                                             sequences=len(data.train))
    train_file = data_files(cfg)[0]
    saved = state.get("loader")
    if saved is not None:
        loader = GlobalBatchLoader(data.train, cfg.train.global_batch, cfg.train.micro_batch, 0, 1,
                                   seed=cfg.train.seed, pad_id=data.pad_id)
        # the step records no file name (a moved file is the same data): the run's config.yaml has the one
        # its last start trained on, which a refusal naming only the new one left the user to guess
        before = rank0_answer(lambda: _trained_on(cfg))
        named = train_file + (f"; {before} when the run last started" if before and before != train_file else "")
        try:
            loader.load_state_dict(saved, f"the training data ({named})")
        except ConfigError as e:
            raise ConfigError(f"resuming from {step_dir}: {e}") from None
    ckpt_dir = checkpoint.run_checkpoint_dir(cfg)
    name = rank0_answer(lambda: differs_from_saved(ckpt_dir, data.tokenizer or "byte"))
    if name:
        now = data.tokenizer or "the byte tokenizer"
        raise ConfigError(f"resuming from {step_dir}: the run's data is tokenized by {now}, but "
                          f"{Path(ckpt_dir) / DIR} holds another tokenizer ({name} differs), the one the run's "
                          "steps were trained with; use that tokenizer's data, or start a new run (a new run_dir) "
                          "from the checkpoint's weights (checkpoint.init_from)")


# the settings naming a recipe's data files, (training, held-out): the fine-tuning recipe's record files
# (polar/finetune_recipe.py), a dataset built by polar data build
DATA_FILES = (("finetune", "train", "eval"), ("data", "path", "eval_path"))


def data_files(cfg) -> tuple[str, str]:
    """The run's training and held-out data as messages name them, by the setting that gives each
    ("finetune.train=prefs.jsonl", "data.eval_path=ds_eval/"; "" for no held-out file); the embedded
    synthetic data by that name."""
    for section, train, held in DATA_FILES:
        given = getattr(cfg, section, None)
        if given is not None and getattr(given, train):
            held_file = getattr(given, held)
            return (f"{section}.{train}={getattr(given, train)}",
                    f"{section}.{held}={held_file}" if held_file else "")
    return "the embedded synthetic data", ""


def _trained_on(cfg) -> str:
    """The training data named in the run's config.yaml (written by each start that passed its checks), as
    data_files names it; "" where it names none or does not read."""
    import yaml

    from engine.yaml_load import safe_load

    try:
        saved = safe_load((Path(cfg.run_dir) / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    for section, train, _ in DATA_FILES:
        given = saved.get(section) if isinstance(saved, dict) else None
        if isinstance(given, dict) and given.get(train):
            return f"{section}.{train}={given[train]}"
    return ""


def run(cfg, recipe) -> int:
    from engine.runtime import init_runtime

    t_start = time.time()
    rt = init_runtime(cfg.parallel, cfg.train.seed)
    say = print if rt.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run_dir)
    say(f"run directory: {run_dir.resolve()}")
    data = prepare_checked_data(cfg, recipe)
    # fine-tuning's steps and warm-up as derived from its data
    warning = schedule_warning(cfg.train, getattr(recipe, "DERIVED_SETTINGS", {}))
    if warning and rt.is_main and first_said(warning):
        say(warning)
    say(data.description)
    # rank 0 writes into both from here on: one that cannot be written (a read-only mount, a file in its
    # path) stops every rank with a message naming it, not rank 0 alone with a traceback
    from engine.checkpoint import check_writable, run_checkpoint_dir, unwritable

    error = unwritable(str(run_dir))
    if error:
        raise _unwritable_run_dir(run_dir, error)
    check_writable(run_checkpoint_dir(cfg))
    lock = hold_checkpoint_dir(cfg, rt.rank)
    try:
        return _train(cfg, recipe, rt, data, say, t_start)
    finally:
        if lock is not None:
            lock.release()


def best_evaluations(history: list, eval_sets: dict, final: dict, step: int, start_step: int) -> dict:
    """Per evaluation set, its best pair accuracy and the step it was reached at (the first of a tie):
    over the history's evaluations of the set as it is now (after its `after_step`, engine.resume_checks.
    eval_sets; this process's alone where that is unknown) and the final evaluation `final` at `step`.
    A set never evaluated is left out."""
    best = {}
    for name in dict.fromkeys([*eval_sets, *final]):
        since = eval_sets.get(name, {}).get("after_step", start_step)
        seen = [(r["step"], r["pair_accuracy"]) for r in history if r.get("eval") == name and r["step"] > since]
        if name in final:
            seen.append((step, final[name]["pair_accuracy"]))
        if seen:
            at, acc = max(seen, key=lambda s: (s[1], -s[0]))
            best[name] = {"step": at, "pair_accuracy": acc}
    return best


def _train(cfg, recipe, rt, data, say, t_start) -> int:
    """run() once the run holds its checkpoint directory."""
    run_dir = Path(cfg.run_dir)
    from engine.checkpoint import run_checkpoint_dir
    from engine.progress import training_only
    from engine.runtime import peak_memory_gb, shutdown_runtime

    if data.tokenizer:
        import torch.distributed as dist

        from polar.checkpoint_tokenizer import save_beside

        # the checkpoints carry the tokenizer of their ids; written once, by rank 0, after every rank
        # has compared it (check_resume_data): a rename under a rank still reading it fails on NFS
        dist.barrier()
        if rt.is_main:
            save_beside(run_checkpoint_dir(cfg), data.tokenizer)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        if hasattr(recipe, "write_run_files"):  # the recipe's own files (fine-tuning: the records set aside)
            recipe.write_run_files(cfg, data)

    from engine.trainer import StoppedBySignal, Trainer

    trainer = Trainer(cfg, rt, data.train, str(run_dir), pad_id=data.pad_id, log=say, evals=data.evals,
                      held_file=data_files(cfg)[1], final_evaluation=True)
    t_train = time.time()
    start_step = trainer.step
    signalled = None
    try:
        history = trainer.fit()
    except StoppedBySignal as e:  # saved and logged: the summary records the stop, then the process exits 143
        history, signalled = trainer.history, e
    train_time = time.time() - t_train
    peak_gb = peak_memory_gb(rt)  # training's peak, before evaluation (polar plan compares against it)

    # a stop file is a scheduler's warning that the job ends soon, SIGTERM its last one before SIGKILL:
    # the checkpoint is saved, and the final evaluation (minutes at scale) is left to the resumed run
    # that finishes the training
    evals = {} if trainer.stopped_by in ("stop_file", "SIGTERM") else data.evals
    if trainer.stopped_by == "stop_file":
        say(f"stopped at step {trainer.step} of {cfg.train.steps} (train.stop_file): final evaluation skipped; "
            "the same command resumes")
    # a time limit or exit_at_step at an evaluation step: fit evaluated these weights (and its checkpoint
    # keeps those rows); evaluating them again costs minutes per set at scale
    done = {r["eval"]: {k: v for k, v in r.items() if k not in ("step", "eval")} for r in history
            if "eval" in r and r["step"] == trainer.step > start_step}
    if set(evals) - set(done):
        say("evaluating ...")
    try:
        results = {name: done[name] if name in done else trainer.evaluate(d) for name, d in evals.items()}
    except BaseException as e:
        # the logs fit left open for the results are closed, the wandb run marked failed: left to wandb's exit
        # hook, it was marked finished where main returns the error's status (a damaged evaluation set's 2)
        trainer.log_final({}, e)
        raise
    # the run's headline figures, in RUN_DIR/metrics.jsonl, TensorBoard and wandb too (marked final)
    trainer.log_final(results)
    if rt.is_main:
        seq_tokens = data.train.per_sequence["tokens"]
        step_tokens = [int(seq_tokens[trainer.loader.global_batch_indices(b)].sum()) for b in range(trainer.step)]
        # a resumed run: `steps` and `tokens` count the whole training, the rate only this process's part
        tokens = sum(step_tokens[start_step:])
        summary, lines = recipe.summarize(data, results) if evals is data.evals else ({}, [])
        train_rows = [r for r in history if "loss" in r and "eval" not in r]
        summary.update({
            "final_loss": train_rows[-1]["loss"] if train_rows else None,
            "steps": trainer.step,
            # time_limit, stop_file, SIGTERM, exit_at_step; None: all steps
            "stopped_by": trainer.stopped_by or None,
            "tokens": sum(step_tokens),
            "resumed_at_step": start_step,
            "tokens_this_run": tokens,
            # the whole fit's wall time: the first step's warm-up, evaluations and saves, the final save
            "tokens_per_second": tokens / train_time if train_time > 0 else None,
            "train_seconds": train_time,
            # the same, training steps only (summed over the progress lines' windows)
            **training_only(history, start_step, rt.world_size),
            "wall_seconds": time.time() - t_start,
            "parameters": trainer.num_parameters,
            "layout": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "vpp": rt.vpp},
            "peak_memory_gb": peak_gb,
            "packing_efficiency": data.train.packing_efficiency,
            "data": data.source or "synthetic",
            "evaluations": results,
            "best_eval": best_evaluations(history, trainer.eval_sets, results, trainer.step, start_step),
            # each set's digest, and the step after which the history's evaluations are of it (a resume may change it)
            "eval_sets": trainer.eval_sets,
            "skipped_steps": trainer.skipped_steps,
            "history": history,
        })
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        for line in lines:
            say(line)
        say(f"wrote {run_dir / 'summary.json'}")
    shutdown_runtime()  # its barrier: no rank exits (torchrun would end rank 0) before the summary is written
    if signalled is not None:
        raise signalled
    return 0


if __name__ == "__main__":
    sys.exit(main())
