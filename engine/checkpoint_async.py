"""checkpoint.async_save: the files of a save are written by a forked process while training goes on.

megatron's machinery does the work: dist_checkpointing.save(async_sharded_save=True) plans the save
and returns an AsyncRequest, and AsyncCallsQueue (non-persistent: TemporalAsyncCaller) copies the
shards to host memory and forks one writer process per rank. The fork is the snapshot of CPU
tensors: megatron copies only tensors that are views (a CPU parameter that owns its storage is
written from the live memory), and the forked writer reads the pages as they were at the fork
while training updates the parameters in place. On a GPU the shards are copied to host memory
before the fork. The save is finalized (megatron's metadata, then engine.checkpoint's trainer
state, rename and `latest`) on every rank once every rank's writer has exited.

Here: the channel the writer process hands its results back through, a writer that keeps the
error of a failed write, and the one save in flight per run.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import threading

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a process forked by the trainer: end when the trainer ends. A writer left behind by a
    killed run would go on writing into a `.partial` directory nobody finalizes (and a restarted
    run saving the same step would find its files changing under it); a results server left
    behind would hold the trainer's memory for good."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: look for the parent instead
        def watch():
            while os.getppid() == parent_pid:
                threading.Event().wait(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the trainer ended before the signal was asked for
        os._exit(1)


def write_buckets(transform_list, use_msc: bool, rank: int, buckets, results_queue) -> None:
    """megatron's FileSystemWriterAsync.write_preloaded_data_multithread without its error
    handling: there a failed write (a full disk's OSError) reaches the trainer as
    "An error is caught while starting worker 0, error: <class 'OSError'>", its text only logged,
    and a failure in one of its threads ends the process without any result. Here the buckets
    are written one after another by megatron's own file writer, and the first error itself is
    handed back, which megatron's finalize raises on every rank."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results = {}
    for i, bucket in enumerate(buckets):
        _, out = FileSystemWriterAsync.write_preloaded_data(transform_list, i, bucket, None, None, True,
                                                            use_msc=use_msc)
        if isinstance(out, Exception):
            results_queue.put(out)
            return
        results[i] = out
    results_queue.put(results)


def _write_in_child(parent_pid: int, *args) -> None:
    die_with_parent(parent_pid)
    write_buckets(*args)


def own_writer(request, forked: bool):
    """`request` with its write done by write_buckets (in a forked process: one that ends with the
    trainer); unchanged where megatron's writer is not the one expected (nothing to write on this
    rank: no function)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    fn = request.async_fn
    if not (isinstance(fn, functools.partial) and fn.func is FileSystemWriterAsync.write_preloaded_data_multithread):
        return request
    mine = functools.partial(_write_in_child, os.getpid()) if forked else write_buckets
    return request._replace(async_fn=functools.partial(mine, *fn.args, **fn.keywords))


_SERVER = None  # the results server of this process, started by its first background save


def results_queue():
    """The queue a writer process puts its results into: megatron's own kind (a Manager's queue,
    served by a process of its own; a pipe would fill with the results of a few hundred tensors
    and block the writer's exit, which the trainer waits for), forked instead of spawned (a
    spawned one re-imports the entry script)."""
    global _SERVER
    if _SERVER is None:
        from multiprocessing.managers import SyncManager

        from torch import multiprocessing as mp

        server = SyncManager(ctx=mp.get_context("fork"))
        server.start(die_with_parent, (os.getpid(),))
        _SERVER = (server, server.Queue())
    return _SERVER[1]


class BackgroundSaves:
    """The save being written in the background (at most one). Every method is called by every
    rank at the same point of the run: finalizing takes collectives."""

    def __init__(self):
        self._calls = None  # megatron's AsyncCallsQueue, made by the first save
        self._errors = None  # the pending save's error translation (a context manager factory)
        self.pending = ""  # the step directory the pending save becomes

    def start(self, request, path: str, errors) -> None:
        """Forks the writer of `request` (its shards already in host memory when this returns);
        `errors()` turns a failure found when it is finalized into the run's error."""
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        assert not self.pending, "one save at a time: finish() the previous one first"
        if self._calls is None:
            self._calls = AsyncCallsQueue(persistent=False)
        self._calls.schedule_async_request(request)
        self.pending, self._errors = path, errors

    def poll(self, wait: bool = False) -> str:
        """Finalizes the pending save if every rank's writer has finished (`wait`: once they have);
        returns its step directory, '' if none was finalized. Nothing pending: no communication;
        pending: one all-reduce of an integer (megatron's liveness check), then the finalize."""
        if not self.pending:
            return ""
        path, errors = self.pending, self._errors
        try:
            with errors():
                done = self._calls.maybe_finalize_async_calls(blocking=wait)
        except BaseException:
            self.pending, self._errors = "", None  # failed on every rank: nothing is pending any more
            raise
        if not done:
            return ""
        self.pending, self._errors = "", None
        return path

    def finish(self) -> str:
        """Waits for the pending save and finalizes it; its step directory ('' if none)."""
        return self.poll(wait=True)
