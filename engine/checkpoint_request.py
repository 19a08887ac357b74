"""megatron's dist_checkpointing save request, adapted to engine.checkpoint's saves: the strategy
the data-parallel replicas share the writing with, the queue its file writer hands results back
through, rank 0's finalize steps whose failure must reach every rank, and the text of the errors
torch.distributed.checkpoint and megatron wrap a failed write (or read) in.

engine.checkpoint decides where a save goes and what becomes of it (step directories, `latest`,
pruning); this module only knows megatron's request.
"""
from __future__ import annotations

import contextlib
import functools
import queue
import re
import weakref


def cause(e: BaseException) -> BaseException:
    """The error inside torch.distributed.checkpoint's CheckpointException (a BaseException that
    wraps each failed rank's error, and whose own text starts with the ranks, not the error)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            return inner[0]
    return e


def dcp_error() -> tuple[type, ...]:
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover
        return ()
    return (CheckpointException,)


def first_line(e: BaseException) -> str:
    e = cause(e)
    text = (str(e).strip().splitlines() or [""])[0]
    text = text.split(". ")[0]  # torch's reader adds sentences of advice after the error
    # megatron's wrapper of a writer's error (its cause does not survive the gather to rank 0)
    if m := re.fullmatch(r"Worker failure: (\[Errno \d+\] .*)", text):
        return f"OSError: {m.group(1)[:300]}"
    return f"{type(e).__name__}: {text[:300]}"


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value`, over the running process group: one all-reduced integer
    (a CUDA tensor under NCCL)."""
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available() and "nccl" in str(dist.get_backend())
    t = torch.full((1,), int(value), dtype=torch.int64,
                   device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def structure(state) -> str:
    """A fingerprint of what a sharded state dict holds, not of its values: each sharded entry's key,
    replica, place in its global tensor, shape and dtype (what decides which replica writes which shard)."""
    import hashlib

    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    h = hashlib.sha1()
    for v in nested_values(state):
        if isinstance(v, ShardedBase):
            data = getattr(v, "data", None)
            h.update(repr((type(v).__name__, v.key, v.replica_id,
                           *(getattr(v, a, None) for a in ("global_shape", "global_offset", "local_shape",
                                                           "axis_fragmentations", "flattened_range", "dtype")),
                           tuple(data.shape) if isinstance(data, torch.Tensor) else None)).encode())
    return h.hexdigest()


# per model (its first chunk, held weakly: a model freed in a process that builds several passes nothing on
# to a new one at its address): (its last save's structure, data-parallel group, strategy)
_SAVE_STRATEGIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def parallel_save_strategy(dp_group, model=None, state=None):
    """megatron's fully parallel save over the data-parallel group: each DP replica writes a 1/DP
    part of the replicated shards, instead of DP rank 0 of each model-parallel shard writing them
    all (at 200+ replicas, a few ranks of one node write the whole checkpoint while the others
    wait). The files are the same. Loading stays megatron's default: its fully parallel load
    exchanges the parts through CUDA tensors only. None: one replica, nothing to share.

    Which replica writes which shard is worked out by gathering every replica's shard metadata, and
    the wrapper then checks the whole save by gathering every rank's over the world (both objects of
    every rank on every rank: 912 at POLAR-7B's scale), at each save where it keeps no distribution.
    With `model` (its first chunk) and `state` (the sharded state dict about to be saved) the strategy
    is the model's last one, keeping its distribution, while the state's structure is the same on
    every rank (one all-reduced integer); a new one otherwise (the model's first save, a save of its
    weights alone), which works it out and checks it again."""
    if dp_group is None or dp_group.size() == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    if model is None:
        return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp_group)
    now = structure(state)
    kept = _SAVE_STRATEGIES.get(model)
    if not min_over_ranks(kept is not None and kept[:2] == (now, dp_group)):  # every rank takes the same way
        kept = (now, dp_group, FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp_group,
                                                                do_cache_distribution=True))
        _SAVE_STRATEGIES[model] = kept
    return kept[2]


_LOCAL_RESULTS: queue.Queue = queue.Queue()


def set_results_queue(background) -> None:
    """megatron's file writer hands its write results back through a queue it makes on first use:
    a multiprocessing Manager started with `spawn`, i.e. a server process that re-imports the entry
    script (seconds and a few hundred MB a rank, and a RuntimeError in a script without a
    `__main__` guard). A synchronous save writes in this process: a thread-safe queue here is the
    same channel without the process. A background save's writer is a forked process: the queue
    of engine.checkpoint_async. The writer takes the queue set when its save is planned; a megatron
    without that module attribute keeps its own."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from engine import checkpoint_async

    if hasattr(filesystem_async, "_results_queue"):
        filesystem_async._results_queue = (_LOCAL_RESULTS if background is None
                                           else checkpoint_async.results_queue())


@contextlib.contextmanager
def write_errors(failed):
    """A shard that was not written (a full disk, a read-only file system) as the error
    `failed(its text)` (engine.checkpoint's CheckpointWriteError) on every rank. megatron's finalize
    raises its CheckpointException on every rank, with the failed ranks' errors on rank 0 only."""
    try:
        yield
    except (OSError, *dcp_error()) as e:
        detail = first_line(e) if cause(e) is not e or isinstance(e, OSError) else "a shard was not written"
        raise failed(detail) from e


def rank0_files_kept(fn, failed: list) -> None:
    """Runs one of megatron's finalize steps, in which rank 0 alone writes a file and every rank
    then meets in a collective: the shards' index `.metadata` (the writer's finish(), before the
    broadcast of the write failures) and `metadata.json` (save_config, before a barrier). Raised
    there, rank 0's error (a full disk, a directory in the way) left the other ranks waiting in
    that collective for good. The error is kept in `failed` instead and the step goes on to its
    collective; the engine's own finalize step reports it to every rank (engine.checkpoint.on_rank0)."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    def kept(write):
        @functools.wraps(write)
        def run(*args, **kwargs):
            try:
                return write(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported once every rank is past the collective
                failed.append(e)

        return run

    originals = FileSystemWriterAsync.finish, serialization.save_config
    FileSystemWriterAsync.finish, serialization.save_config = (kept(f) for f in originals)
    try:
        fn()
    finally:
        FileSystemWriterAsync.finish, serialization.save_config = originals
