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


def parallel_save_strategy(dp_group):
    """megatron's fully parallel save over the data-parallel group: each DP replica writes a 1/DP
    part of the replicated shards, instead of DP rank 0 of each model-parallel shard writing them
    all (at 200+ replicas, a few ranks of one node write the whole checkpoint while the others
    wait). The files are the same. Loading stays megatron's default: its fully parallel load
    exchanges the parts through CUDA tensors only. None: one replica, nothing to share."""
    if dp_group is None or dp_group.size() == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp_group)


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
