"""Writing checkpoints with megatron's dist_checkpointing (any TP/PP layout can reload them:
engine.checkpoint_load reads them back) and finding them: the newest complete step, the step a
path names and its trainer state (engine.checkpoint_model reads the model settings recorded
with it).

Each checkpoint is written into `step_XXXXXXXX.partial/` and renamed to `step_XXXXXXXX/` only once
every rank has finished and its files are on the disk (fsynced); `latest` (written atomically and
fsynced) then names it, once the rename is on the disk too. A run killed mid-save leaves only a
`.partial` directory, which resume ignores (and names), so it continues from the last complete
checkpoint; the next save deletes it. A run killed between the rename and `latest` leaves a complete
step `latest` does not name: `latest.next`, written before the rename, names it, the step `latest`
named then and the save's id (in its trainer_state.json), and latest() takes it while `latest`
still names that step. Steps above the one `latest` names are otherwise not taken: those of a run
that went back to an older step are an abandoned branch. A machine that fails (power, a lost node)
leaves no step name, nor `latest`, naming files that never reached the disk. A step saved again (a
resume from an older one) is replaced only once the new one is complete. Only `step_N` directories
are steps: other entries in the directory are neither resumed nor pruned. A file that does not read
back, an unwritable directory or a failed save is an error naming the path and what to do.
"""
from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import weakref
from pathlib import Path

import torch.distributed as dist

from engine import durable_file
from engine.checkpoint_request import (cause, dcp_error, first_line, parallel_save_strategy, rank0_files_kept,
                                       set_results_queue, write_errors)
from engine.config import ConfigError

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.json"  # the model settings the weights were saved with (engine.config.ModelConfig)
# megatron's dist_checkpointing config (backend, version), which its save writes once every shard is written
# and its load reads first ("... is not a distributed checkpoint" where it is missing)
MEGATRON_FILE = "metadata.json"
# megatron's distributed-optimizer formats (engine.config.CheckpointConfig.optimizer_format); a
# step saved before the setting existed holds the first
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
LATEST = "latest"
# the step a save is publishing, while between its rename and `latest` (latest()): {"step": its name,
# "after": what `latest` held then (None: no `latest`), "save_id": its trainer state's}
PUBLISHING = "latest.next"
SAVE_ID = "save_id"  # in a step's trainer state: the save that wrote it (latest.next names it)
# a step directory's name: `step_` and the step number (8 digits, more past 99,999,999). Nothing else
# in a checkpoint directory is a step: a copy such as step_00000004.bak is never resumed or pruned
_STEP_NAME = re.compile(r"step_(\d{8,})")
_PARTIAL_NAME = re.compile(r"step_(\d{8,})\.partial")
_DELETING = ".deleting"  # a pruned step while it is deleted


class CheckpointError(ConfigError):
    """A checkpoint a run would load that does not read back, or a checkpoint directory it cannot
    write: found at start-up, like a bad setting (`config error:`, exit 2). The message names the
    file and what to do."""


class CheckpointWriteError(RuntimeError):
    """A save that failed during training (a full disk, say); the message names the directory,
    the checkpoints kept and what to do."""


def step_number(path) -> int | None:
    """The step of a step directory's name (step_00000042 -> 42), None for any other name."""
    m = _STEP_NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def _steps(root: Path) -> list[Path]:
    """The complete step directories in `root`, oldest first (by step number, not by name)."""
    found = [p for p in root.glob("step_*") if step_number(p) is not None and is_step(p)]
    return sorted(found, key=step_number)


def partial_saves(root, after: int = -1) -> list[Path]:
    """`step_N.partial` directories (saves that did not finish) with N > `after`, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(root).glob("step_*.partial")
             if (m := _PARTIAL_NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for n, p in sorted(found) if n > after]


def damaged(path, e: Exception):
    """The error for a checkpoint file that does not read back: names it, and what to do. A key the
    load asks for and the files lack (megatron's KeyError) is no damage: the step was written by a run
    with other settings (the plain optimizer's state is per parameter, the distributed one's is not),
    and moving it away would throw a good checkpoint out."""
    path = Path(path)
    step = next((q for q in (path, *path.parents) if step_number(q) is not None), path)
    if isinstance(cause(e), KeyError):
        return other_settings(step, e)
    before = [p for p in _steps(step.parent) if step_number(p) < (step_number(step) or 0)]
    instead = (f"move {step} out of {step.parent} and run again: the newest complete step there is then "
               f"{before[-1]}" if before else
               f"move {step} out of {step.parent}, or point the run at another checkpoint")
    return CheckpointError(f"{path}: the checkpoint does not read back ({first_line(e)}). If its files were "
                           f"damaged after it was written (a full disk, a copy cut short): {instead}")


def other_settings(step: Path, e: BaseException) -> CheckpointError:
    """A step whose optimizer state this run's optimizer does not read (saved with other settings)."""
    return CheckpointError(
        f"{step}: this run's optimizer does not read the optimizer state saved there ({first_line(e)}): it was "
        f"saved with other settings (parallel.distributed_optimizer, say; the files are not damaged). Resume "
        f"with the settings it was saved with (the run's config.yaml records them), or start a new run (a new "
        f"run_dir) from its weights with checkpoint.init_from={step}")


def unwrap(chunk):
    """The RewardModel inside megatron's DDP wrapper: keys must not depend on the wrapping."""
    return getattr(chunk, "module", chunk)


# the tensors whose rows are the vocabulary's, padded to a multiple of parallel.tp (and model.
# make_vocab_size_divisible_by; engine.parallelize.padded_vocab_size): a step saved at one TP holds
# another row count than a model at another TP when model.vocab_size is not a multiple of both.
# megatron loads its embedding across that (allow_shape_mismatch: the rows both have are read, the
# others start at zero; the rows past the vocabulary are no token), as it does its own output layer;
# the LM head (train.aux_lm_weight > 0) is a layer of this engine's, marked the same way
VOCAB_ROWS = ("lm_head.weight",)


def model_state(chunks) -> dict:
    """The model's sharded state dict for dist_checkpointing, by chunk ("model", or "model0", "model1"...
    for virtual pipeline chunks), as a save writes it and a load asks for it."""
    state = ({"model": unwrap(chunks[0]).sharded_state_dict()} if len(chunks) == 1 else
             {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)})
    for sd in state.values():
        for name in VOCAB_ROWS:
            if name in sd:  # its optimizer state, made from it, is marked too
                sd[name].allow_shape_mismatch = True
    return state


# the models (their first chunk) whose first save checked the sharding's integrity: held weakly, so
# that a model freed in a process that builds several cannot pass its check on to a new one at its address
_SAVES_CHECKED: weakref.WeakSet = weakref.WeakSet()


def integrity_checked(chunks) -> bool:
    """Whether a save of this model in this process has checked the sharding's integrity already."""
    return chunks[0] in _SAVES_CHECKED


def optimizer_metadata(fmt: str) -> dict:
    if fmt not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer format {fmt!r}: expected one of {', '.join(OPTIMIZER_FORMATS)}")
    return {"distrib_optim_sharding_type": fmt}


def save(ckpt_dir: str, step: int, chunks, optimizer, trainer_state: dict, keep: int = 2,
         model_settings: dict | None = None, dp_group=None, optimizer_format: str = OPTIMIZER_FORMATS[0],
         background=None) -> str:
    """`dp_group`: the data-parallel group, whose replicas then share the writing. The optimizer
    format is recorded in the trainer state, which `load` reads it from. `background` (an
    engine.checkpoint_async.BackgroundSaves): the state is copied and written by a forked process
    while the caller goes on; its save pending before is finalized first (one at a time), and this
    one by its poll() or finish(). Returns the step directory (once finalized, for a background one)."""
    from megatron.core import dist_checkpointing

    from engine import checkpoint_async

    if background is not None:
        background.finish()
    root = Path(ckpt_dir)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    rank = dist.get_rank()
    # rank 0's file operations: a failure is broadcast so that every rank raises it (instead of the
    # others waiting at the next barrier)
    error = on_rank0(rank, lambda: _start_save(root, partial))
    if error:
        raise _write_failed(root, partial, error)
    state = model_state(chunks)
    if optimizer is not None:  # None: weights only (e.g. initial weights, before any step)
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=optimizer_metadata(optimizer_format))
        trainer_state = {**trainer_state, "optimizer_format": optimizer_format}
    # as it is now: the trainer's history lists grow while a background save is written
    trainer_state = json.loads(json.dumps(trainer_state))
    set_results_queue(background)
    try:
        # megatron's check that the ranks' shards cover every tensor exactly once gathers every rank's
        # shard metadata on every rank (seconds per save at hundreds of ranks); the structure does not
        # change within a run, so the first save of the process checks it (the fully parallel strategy
        # checks it itself, whenever it works out a new distribution). The request is the write
        # (the shards copied to host memory first) and its finalize (megatron's metadata files)
        strategy = parallel_save_strategy(dp_group, chunks[0], state)
        request = dist_checkpointing.save(state, str(partial), sharded_strategy=strategy,
                                          validate_access_integrity=strategy is None and not integrity_checked(chunks),
                                          async_sharded_save=True, async_strategy="mcore")
        _SAVES_CHECKED.add(chunks[0])
    except (OSError, *dcp_error()) as e:  # a shard not written (a full disk, a read-only file system)
        if not isinstance(cause(e), OSError):
            raise
        raise _write_failed(root, partial, first_line(e)) from e
    request = checkpoint_async.own_writer(request, forked=background is not None)
    megatron_steps = checkpoint_async.finalize_parts(request)  # for a run that fails while it is written
    failed: list = []  # rank 0's error in megatron's own finalize (its metadata files)
    request = request._replace(finalize_fns=[functools.partial(rank0_files_kept, fn, failed)
                                             for fn in request.finalize_fns])

    def files():  # rank 0's last step
        if failed:
            raise failed[0]
        _finish_save(root, partial, final, trainer_state, model_settings, keep)

    def finish():  # after every rank's write and megatron's metadata (which ends with a barrier)
        error = on_rank0(rank, files)
        if error:
            raise _write_failed(root, partial, error)

    request.add_finalize_fn(finish)
    failed_write = functools.partial(_write_failed, root, partial)
    if background is not None:
        background.start(request, str(final), lambda: write_errors(failed_write),
                         files=files, megatron_steps=megatron_steps)
        return str(final)
    with write_errors(failed_write):
        request.execute_sync()
    return str(final)


def from_rank0(rank: int, fn) -> tuple:
    """Runs `fn` on rank 0; returns (its result, its error's text) on every rank: (None, text) when
    it failed, (result, '') when it succeeded. A file step only rank 0 takes, whose failure must
    stop every rank (the others would wait for it). An error that is not an OSError (a bug, not
    the file system) is raised again on rank 0 once the others have its text, so that its
    traceback is kept."""
    box, bug = [None, ""], None
    if rank == 0:
        try:
            box[0] = fn()
        except Exception as e:  # noqa: BLE001 - any error: the other ranks must not wait for rank 0
            box[1], bug = first_line(e), (None if isinstance(e, OSError) else e)
    dist.broadcast_object_list(box, src=0)
    if bug is not None:
        raise bug
    return box[0], box[1]


def on_rank0(rank: int, fn) -> str:
    """from_rank0 for a step whose result is its success: its error's text on every rank, '' when
    it succeeded."""
    def step():
        fn()

    return from_rank0(rank, step)[1]


def _start_save(root: Path, partial: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    # megatron's save lists the directory on rank 0 alone before its first collective (a refusal
    # there left the other ranks waiting in it): listed here, a refusal stops every rank
    next(partial.iterdir(), None)


def _finish_save(root: Path, partial: Path, final: Path, trainer_state: dict, model_settings, keep: int) -> None:
    save_id = secrets.token_hex(8)
    (partial / STATE_FILE).write_text(json.dumps({**trainer_state, SAVE_ID: save_id}, indent=1))
    if model_settings is not None:
        (partial / MODEL_FILE).write_text(json.dumps(model_settings, indent=1))
    # on the disk before a name publishes them: after a power or node failure the renames below
    # (metadata operations, applied at once by a Lustre or NFS server) could otherwise name a step
    # whose trainer_state.json is empty or missing, and `latest` a step that is not there. megatron
    # fsyncs the shards each rank writes (*.distcp), not its metadata.json: rank 0 syncing every
    # rank's shards again would cost an RPC per file on Lustre (thousands at scale), for nothing.
    # test_checkpoint.py checks that each .distcp was fsynced before the rename all the same
    durable_file.sync_tree(partial, synced=lambda name: name.endswith(".distcp"))
    try:
        named = _marker(root)
        cut = _published(root, named)
    except OSError:  # a `latest` (or latest.next) rank 0 may not read, which the rename below replaces
        named, cut = None, None
    if cut is not None:
        # an earlier save that a kill kept from `latest` (this run resumed from it, say): named now,
        # or a kill before this save's rename below would leave latest.next naming a step not there
        # yet, and latest() would go back to the step before that earlier one
        durable_file.write_file(root / LATEST, cut)
        named = cut
    # not fsynced: the directory's fsync after the rename makes its name durable, and bytes that
    # did not reach the disk read as no JSON, which latest() ignores (it then takes `latest`, as before)
    (root / PUBLISHING).write_text(json.dumps({"step": final.name, "after": named, SAVE_ID: save_id}))
    # a step saved before (a resume from an older step) is replaced only now that the new one is
    # complete: deleted when the save began, a save cut short lost it. Renamed away first (atomic; the
    # deletion is _prune's, as for a pruned step): deleted under its name, a kill cut short left it half
    # deleted there, its trainer_state.json perhaps still in it, a step to resolve() and to latest()'s
    # fallback that does not load
    if final.exists():
        trash = final.with_name(final.name + _DELETING)
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(partial, final)
    durable_file.sync_dir(root)  # the step's name, before `latest` names it
    durable_file.write_file(root / LATEST, final.name)
    (root / PUBLISHING).unlink(missing_ok=True)
    _prune(root, keep, final)


def _write_failed(root: Path, partial: Path, error: str) -> CheckpointWriteError:
    done = latest(str(root))
    kept = f"the complete checkpoints are kept (newest: {done})" if done else "no complete checkpoint was written yet"
    return CheckpointWriteError(
        f"writing the checkpoint {partial} failed ({error}); {kept}. Free space or make {root} writable "
        f"(or set checkpoint.dir), then run the same command again to resume")


def unwritable(directory: str) -> str:
    """'' when rank 0 can write into `directory` (created if missing), else the error's text, on
    every rank (so that every rank stops, not rank 0 alone)."""
    root = Path(directory)

    def probe():
        root.mkdir(parents=True, exist_ok=True)
        f = root / f".write_test.{os.getpid()}"
        f.write_text("")
        f.unlink()

    return on_rank0(dist.get_rank(), probe)


def check_writable(ckpt_dir: str) -> None:
    """Raises CheckpointError on every rank when rank 0 cannot write into `ckpt_dir` (created if
    missing): found at start-up, not at the first save after checkpoint.save_interval steps."""
    error = unwritable(ckpt_dir)
    if error:
        raise unwritable_checkpoint_dir(ckpt_dir, error)


def unwritable_checkpoint_dir(ckpt_dir: str, error: str) -> CheckpointError:
    """The refusal of a checkpoint directory that cannot be written (`error`: why), the run's and
    --check-config's (engine.pretrain.check_before_launch)."""
    return CheckpointError(f"checkpoint directory {Path(ckpt_dir)} is not writable ({error}); the run would lose "
                           f"its checkpoints. Make it writable or set checkpoint.dir (or run_dir) to a directory "
                           f"that is")


def _prune(root: Path, keep: int, saved: Path) -> None:
    """Keeps `saved` and the keep-1 newest steps before it. Steps after it (left by another run in
    the same directory) are not this run's to delete; the newest by name is not necessarily
    `saved`, which is why pruning by name alone once deleted the step just written. Only step_N
    directories are steps (a user's copy, step_00000004.bak, stays). Saves cut short before
    `saved` (step_N.partial, never loaded) are deleted whatever `keep` is: they held disk space
    for good."""
    n = step_number(saved)
    for old in partial_saves(root):
        if int(_PARTIAL_NAME.fullmatch(old.name).group(1)) < n:
            shutil.rmtree(old, ignore_errors=True)
    for old in root.glob(f"step_*{_DELETING}"):  # a deletion cut short by a kill
        shutil.rmtree(old, ignore_errors=True)
    if keep <= 0:
        return
    older = [p for p in root.glob("step_*") if p.is_dir() and (m := step_number(p)) is not None and m < n]
    older.sort(key=step_number)
    for old in older[:max(len(older) - (keep - 1), 0)]:
        # renamed first (atomic): a kill during the deletion leaves no half-deleted step that still
        # looks complete (its trainer_state.json there, shards gone)
        trash = old.with_name(old.name + _DELETING)
        try:
            os.replace(old, trash)
        except OSError:  # pruning is housekeeping: the step just saved is complete either way
            continue
        shutil.rmtree(trash, ignore_errors=True)


# the job a checkpoint was written by: torchrun's rendezvous id (the same in every restart of one
# launch; the SLURM script passes the job id) and SLURM's job id (kept by a requeue)
JOB_IDS = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def job_identity(env=None) -> dict:
    """This process's job ids that name one job ({} where none does: torchrun's default id is "none")."""
    env = os.environ if env is None else env
    return {k: env[k] for k in JOB_IDS if env.get(k, "none") != "none"}


def read_state(step_dir: str) -> dict:
    """A step's trainer state ({} for a weights-only step)."""
    f = Path(step_dir) / STATE_FILE
    if not f.is_file():
        return {}
    try:
        state = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise damaged(f, e) from None
    if not isinstance(state, dict):
        raise damaged(f, ValueError(f"a JSON object is expected, not {type(state).__name__}"))
    return state


class CheckpointNotFound(FileNotFoundError):
    """A path that is neither a checkpoint directory nor one complete step inside one."""


def is_step(path: Path) -> bool:
    """A complete step directory: written by `save` (trainer state) or by dist_checkpointing alone
    (weights only, e.g. a converted model)."""
    # a `.deleting` one (a pruned or replaced step being removed) may still hold its state file
    return path.is_dir() and not path.name.endswith((".partial", _DELETING)) and (
        (path / STATE_FILE).is_file() or (path / MEGATRON_FILE).is_file())


def incomplete(step: Path) -> str:
    """'' for a step megatron's load can start on, else why not: a step `save` wrote holds trainer_state.json
    and megatron's metadata.json (written last by megatron, before the step's rename), so one holding the
    first and not the second is a copy that did not finish (cp, rsync), which megatron's load refused with
    a traceback. A step without trainer_state.json (a converted model's weights) is one by its
    metadata.json alone (is_step)."""
    if not (step / STATE_FILE).is_file() or (step / MEGATRON_FILE).is_file():
        return ""
    why = (f"an incomplete copy of a checkpoint step: it holds {STATE_FILE} but not {MEGATRON_FILE} (megatron's, "
           f"written when the save finished); copy the step again whole")
    if step_number(step) is None:
        return why
    before = [p for p in _steps(step.parent) if step_number(p) < step_number(step) and not incomplete(p)]
    return why + (f", or move it out of {step.parent}: the newest complete step there is then {before[-1]}"
                  if before else "")


def _import_hint(p: Path) -> str:
    """The way to a checkpoint from a model in transformers' format (a directory of config.json and
    safetensors, or a GGUF file), which the engine does not read: the converter's command (polar's CLI)."""
    if p.is_file() and p.suffix == ".gguf":
        found = "a GGUF file"
    elif p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        found = "a transformers checkpoint (config.json, *.safetensors)"
    else:
        return ""
    return f"; it is {found}, which the engine does not read: import it with `polar convert hf-to-engine {p} DST` " \
           "and give DST"


def resolve(path: str) -> str:
    """A checkpoint directory -> its newest complete step; a step directory -> itself; a run
    directory -> the newest complete step of its checkpoints/."""
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFound("no such directory")
    if is_step(p):
        found = str(p)
    else:
        found = latest(str(p)) if p.is_dir() else None
    if found is None and (p / "checkpoints").is_dir():
        found = latest(str(p / "checkpoints"))
    if found is None:
        if p.name.endswith(_DELETING) and p.is_dir():
            newest = latest(str(p.parent))
            raise CheckpointNotFound(f"a step being deleted (pruned, or replaced by a new save of it), not a "
                                     f"checkpoint; the newest complete one beside it: {newest or 'none'}")
        if p.name.endswith(".partial") and p.is_dir():
            newest = latest(str(p.parent))
            raise CheckpointNotFound(f"a save that did not finish (the run was stopped while writing it), not a "
                                     f"checkpoint; the newest complete one beside it: "
                                     f"{newest or 'none'}")
        cut = [c for d in (p, p / "checkpoints") if d.is_dir() for c in partial_saves(d)]
        raise CheckpointNotFound(
            "neither a checkpoint directory (with a `latest` marker or step_* directories), a run "
            "directory holding one, nor one complete step directory"
            + (f"; it holds only saves that did not finish ({', '.join(c.name for c in cut)})" if cut else "")
            + _import_hint(p))
    if why := incomplete(Path(found)):
        raise CheckpointNotFound(why if Path(found) == p else f"its newest step {found} is {why}")
    return found


def run_checkpoint_dir(cfg) -> str:
    """Where a run's checkpoints go: checkpoint.dir, else run_dir/checkpoints."""
    return cfg.checkpoint.dir or str(Path(cfg.run_dir) / "checkpoints")


def _marker(root: Path) -> str | None:
    """What `latest` names (None: no `latest`); bytes that do not decode name no step, as another
    name does."""
    marker = root / LATEST
    return marker.read_text(errors="replace").strip() if marker.is_file() else None


def _published(root: Path, named: str | None) -> str | None:
    """The name of the step that latest.next says a save renamed into place while `latest` held
    `named`, if that step is there, complete, and written by that save; else None. A `latest` that
    changed since (a later save, a run that went back to an older step) leaves it unused, and so
    does a step of that name from another save (one saved again, killed before its rename)."""
    f = root / PUBLISHING
    if not f.is_file():
        return None
    try:
        entry = json.loads(f.read_text())
    except FileNotFoundError:  # the save removed it since: `latest` names its step
        return None
    except (UnicodeDecodeError, ValueError):  # not fsynced: after a power failure it may hold nothing
        return None
    if not isinstance(entry, dict) or entry.get("after") != named or not entry.get(SAVE_ID):
        return None
    name = entry.get("step")
    if not isinstance(name, str) or not _STEP_NAME.fullmatch(name) or not is_step(root / name):
        return None
    try:
        saved = read_state(str(root / name))
    except CheckpointError:  # a damaged state file: which save wrote it is unknown
        return None
    return name if saved.get(SAVE_ID) == entry[SAVE_ID] else None


def latest(ckpt_dir: str) -> str | None:
    """The newest complete checkpoint in `ckpt_dir`, or None: the step a save published while `latest`
    still names the step it named then (_published: the save was killed before `latest` named it),
    else the step `latest` names, else the newest complete step."""
    root = Path(ckpt_dir)
    named = _marker(root)
    cut = _published(root, named)
    if cut is not None:
        return str(root / cut)
    if named is not None:
        path = root / named
        if step_number(path) is not None and is_step(path):
            return str(path)
    done = _steps(root)
    return str(done[-1]) if done else None


def latest_agreed(ckpt_dir: str) -> str | None:
    """`latest` as rank 0 sees it, on every rank: on a file system that caches attributes (NFS) a
    rank restarted soon after a save could see an older step than the others, and load it."""
    found, error = from_rank0(dist.get_rank(), lambda: latest(ckpt_dir))
    if error:  # e.g. a `latest` or a step's trainer_state.json rank 0 may not read
        raise CheckpointError(f"{ckpt_dir}: rank 0 could not find the newest checkpoint to resume from ({error}); "
                              f"make the checkpoint directory and its files readable by the run, then run it again")
    return found
