"""Reading a checkpoint step back into a model of any TP/PP layout: its weights (and optimizer state
for a resume), the tensors it holds (their global shapes, whether it has an LM head), and a read
failure found by one rank raised alike on every rank, named as damaged files or as another model's
step; what every rank of a run would read alike of a step, read by rank 0 for all (rank0_answer).
Writing steps and finding them (latest, resolve, the recorded model settings) is engine.checkpoint's.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from engine import optimizer_state
from engine.checkpoint import (MODEL_FILE, OPTIMIZER_FORMATS, CheckpointError, damaged, incomplete, model_state,
                               optimizer_metadata, other_settings, read_state, unwrap)
from engine.checkpoint_request import cause, dcp_error, first_line, min_over_ranks
from engine.config import ConfigError


def rank0_answer(fn):
    """fn() asked of rank 0 alone, its answer on every rank of the running process group (fn() here
    where none runs, or a group of one): what a resume reads of a step that every rank would read alike
    (its trainer state, its tensors' metadata, whose size grows with the ranks that wrote it: a read
    of each by all of POLAR-7B's 912 ranks, several times over, on one shared file system). A
    ConfigError of fn's (a damaged file, a refused resume) is raised on every rank, its message whole
    (each rank's stop_alike compares its own with rank 0's); any other error as from_rank0 does: rank 0
    raises it, the others a RuntimeError naming it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box, bug = [None, None], None
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except ConfigError as e:
            box[1] = e
        except Exception as e:  # noqa: BLE001 - any error: the other ranks must not wait for rank 0
            box[1], bug = RuntimeError(f"rank 0 failed: {first_line(e)}"), e
    dist.broadcast_object_list(box, src=0)
    if bug is not None:
        raise bug
    if box[1] is not None:
        raise box[1]
    return box[0]


# weights a run may add to a checkpoint's model: the auxiliary LM head (train.aux_lm_weight > 0)
# of a run initialised from a pre-training or a conversion that had none
OPTIONAL_PREFIXES = ("lm_head.",)


def tensors_metadata(path) -> dict:
    """Each tensor of a step (its .metadata: global shape, dtype), by key; CheckpointError where the
    metadata is missing or damaged."""
    from megatron.core import dist_checkpointing

    loadable_state(Path(path), read=False)  # an incomplete copy named as such, not as damaged files
    try:
        return dist_checkpointing.load_tensors_metadata(str(path))
    except Exception as e:  # noqa: BLE001 - a missing or truncated .metadata / metadata.json
        raise damaged(path, e) from e


def _tensor_shapes(path) -> dict[str, tuple]:
    """The global shape of each tensor of a step, by key (its .metadata)."""
    return {key: tuple(getattr(t, "global_shape", ())) for key, t in tensors_metadata(path).items()}


def _tensor_keys(path) -> set[str]:
    return set(_tensor_shapes(path))


def has_lm_head(path: str) -> bool:
    return "lm_head.weight" in _tensor_keys(path)


def _keys_or_error(path: Path):
    """_tensor_keys, or its CheckpointError (a missing or damaged .metadata), which only a rank holding
    an optional module raises: on the others the load itself names the damage."""
    try:
        return _tensor_keys(path)
    except CheckpointError as e:
        return e


def _drop_absent_optional(state: dict, path: Path, resuming: bool) -> dict:
    """The optional modules this model has and the checkpoint lacks (judged by their `.weight`
    tensor; their extra state goes with them), removed from the load request so they keep their
    initialisation; returned per chunk key so they are put back after the load. Resuming needs
    every weight: the optimizer state would not match. The step's tensors are asked of rank 0 (its
    .metadata grows with the ranks that wrote it; megatron's load reads it on every rank already),
    by every rank: a pipeline's stages differ in which optional modules they hold."""
    present = rank0_answer(lambda: _keys_or_error(path))
    kept: dict = {}
    for chunk_key, sd in state.items():
        for prefix in OPTIONAL_PREFIXES:
            names = [n for n in sd if n.startswith(prefix)]
            weight = sd.get(prefix + "weight")
            if not names or weight is None:
                continue
            if isinstance(present, CheckpointError):
                raise present
            if weight.key in present:
                continue
            if resuming:
                raise ValueError(f"{path}: has no {prefix}weight (saved with train.aux_lm_weight=0); a run resumes "
                                 "with the settings it was saved with: set train.aux_lm_weight=0, or start a new "
                                 "run with checkpoint.init_from")
            kept.setdefault(chunk_key, {}).update({n: sd.pop(n) for n in names})
    return kept


def _other_shapes(path: Path, chunks) -> CheckpointError | None:
    """The error for a load refused because tensors of the step have other global shapes than this
    model's (megatron: "Global shape mismatch"), None where they agree: a step of another model
    (its settings are compared before a run's load, check_model_matches; not by every caller), not
    damaged files, which the message said, advising to move a good checkpoint away."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    try:
        saved = _tensor_shapes(path)
    except CheckpointError:
        return None
    here = {t.key: tuple(t.global_shape) for t in nested_values(model_state(chunks))
            if isinstance(t, ShardedTensor) and not t.allow_shape_mismatch}
    differ = sorted((key, saved[key], shape) for key, shape in here.items() if key in saved and saved[key] != shape)
    if not differ:
        return None
    shown = "; ".join(f"{key} {a} there, {b} here" for key, a, b in differ[:3])
    shown += f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    named = f" ({path / MODEL_FILE} names them)" if (path / MODEL_FILE).is_file() else ""
    return CheckpointError(f"{path}: its tensors have other shapes than this model's ({shown}); the files are not "
                           f"damaged: it holds a model of other settings{named}")


def _read_by_every_rank(path: Path, chunks, failed: BaseException | None) -> CheckpointError | None:
    """The first failing rank's error, on every rank (None when each rank read its part): megatron
    reads a rank's part of a step on that rank alone (torch.distributed.checkpoint with no_dist), so a
    shard file that does not read back stopped only the ranks that read it, while the others went on
    into the run; and a run prints rank 0's error alone, which then had none to print (the failing
    rank's text was lost, the job ended by a collective broken or torn down)."""
    error = None if failed is None else (_other_shapes(path, chunks) or damaged(path, failed))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    # the first failing rank found by an all-reduce, its text sent by it alone: a gather of every rank's
    # answer was world-size objects on every rank (912 at POLAR-7B's scale)
    world = dist.get_world_size()
    rank = min_over_ranks(world if error is None else dist.get_rank())
    if rank == world:
        return None
    box = [None if error is None else str(error)]
    dist.broadcast_object_list(box, src=rank)
    text = box[0]
    return CheckpointError(text if rank == 0 else f"{text} (found by rank {rank}, which reads that part of it)")


def loadable_state(p: Path, read: bool = True) -> dict | None:
    """The step's trainer state (where `read`), once the step is one megatron's load can start on: a resume
    from the `latest` of a directory holding an incomplete copy of a step took it (is_step) and crashed in
    megatron ("... is not a distributed checkpoint"), or named it damaged (tensors_metadata). The entry
    script's start-up check reads the state through it (engine.pretrain.check_resume_data)."""
    if why := incomplete(p):
        raise CheckpointError(f"{p}: {why}")
    return read_state(str(p)) if read else None


def load(path: str, chunks, optimizer=None, state: dict | None = None) -> dict:
    """Loads model weights (and optimizer state if given) into this layout; returns trainer state
    (`state`: the step's read_state, where the caller has it; else read by rank 0 for every rank).
    A weights-only load (optimizer None) into a model with an LM head from a checkpoint without
    one keeps the head's initialisation (`has_lm_head` tells the caller)."""
    from megatron.core import dist_checkpointing

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    read = rank0_answer(lambda: loadable_state(p, read=state is None))
    trainer_state = read if state is None else state
    state = model_state(chunks)
    kept = _drop_absent_optional(state, p, resuming=optimizer is not None)
    if optimizer is not None:
        optimizer_state.materialise(optimizer)
        fmt = trainer_state.get("optimizer_format", OPTIMIZER_FORMATS[0])
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=optimizer_metadata(fmt))
    failed = None
    try:
        loaded = dist_checkpointing.load(state, str(p))
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, *dcp_error()) as e:
        # a truncated or missing shard file (torch: "PytorchStreamReader failed reading zip archive",
        # EOF, a missing file), wrapped by torch.distributed.checkpoint in a CheckpointException
        if cause(e) is e and not isinstance(e, (OSError, EOFError, pickle.UnpicklingError, RuntimeError)):
            raise  # (a CheckpointException wraps any read failure: a truncated .metadata is an AssertionError)
        failed = e
    error = _read_by_every_rank(p, chunks, failed)
    if error is not None:
        raise error from failed
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, c in zip(keys, chunks):
        module = unwrap(c)
        if key in kept:
            current = module.state_dict()
            loaded[key].update({name: current[name] for name in kept[key] if name in current})
        module.load_state_dict(loaded[key])
    if optimizer is not None:
        # no_grad: megatron's dp_reshardable load copies into the main parameters without it (its
        # other loads have it), which autograd refuses where they are the model's fp32 leaves
        with optimizer_state.torch_adam_step_tolerated(), torch.no_grad():
            try:
                optimizer.load_state_dict(loaded["optimizer"])
            except ValueError as e:
                # the param groups of another optimizer (a step saved before parallel.distributed_optimizer
                # was recorded, then changed)
                if "parameter group" not in str(e):
                    raise
                raise other_settings(p, e) from e
        optimizer_state.after_load(optimizer)
    return trainer_state
