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
error of a failed write, the one save in flight per run, and what becomes of it when the run fails
while it is written (BackgroundSaves.leave).
"""
from __future__ import annotations

import datetime
import functools
import itertools
import os
import pickle
import signal
import time
from pathlib import Path

from engine.checkpoint_request import first_line
from engine.worker_processes import die_with_parent

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
    # Ctrl-C reaches every process of the terminal's group: the trainer decides what becomes of
    # the write (BackgroundSaves.leave), and the writer ends with it in any case
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


def _free_variables(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def finalize_parts(request):
    """What megatron's two finalize steps of `request` work with, for a finalize without them
    (BackgroundSaves.leave): (the shards' writer, the global metadata of the plan (rank 0's; None
    on the others), the checkpoint directory, megatron's checkpoint config). None where its steps
    are not the ones expected (another megatron): such a save is only finalized the usual way."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig

    try:
        write, metadata_file = request.finalize_fns
        writer, global_metadata, _ = _free_variables(write)["save_state_dict_ret"]
        files = _free_variables(metadata_file)
        strategy = files["sharded_strategy"]
        return writer, global_metadata, files["checkpoint_dir"], CheckpointingConfig(strategy.backend, strategy.version)
    except (AttributeError, KeyError, TypeError, ValueError):  # ValueError: an empty cell, a count unpacked
        return None


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


# BackgroundSaves.leave: how long a rank that stops with an error waits for every other rank to
# stop too. Ranks that meet the same error (one raised by every rank at the same point, a Ctrl-C
# that reaches each) come within the skew of a step; a rank waiting in a collective of the step
# for the failed one never comes, however long it is waited for.
AGREE_S = 20.0
# ... and how long the ranks that agreed wait for each other's writes once they have
WRITES_S = 3600.0
# how often a rank other than 0 asks the job's store for rank 0's decision while it waits (rank 0 counts
# the ranks come every 50 ms): every rank asks alike, 911 of them at POLAR-7B's scale, and one store
# serves them all (asked every 50 ms, 18,000 requests a second beside rank 0's); a store's wait is no
# way out, as one that times out (rank 0 never comes) writes c10d's socket warnings to stderr
DECISION_POLL_S = 0.5


# saves started in this process, by every trainer it builds (the same count on every rank): the key
# space of a stop's agreement (_finish_agreed), which a count of one trainer's saves would share with
# an earlier trainer's in the same process, whose `done` a rank would then read as this save's
_SAVES_STARTED = itertools.count(1)


class BackgroundSaves:
    """The save being written in the background (at most one). Every method but leave() is called
    by every rank at the same point of the run: finalizing takes collectives."""

    def __init__(self):
        self._calls = None  # megatron's AsyncCallsQueue, made by the first save
        self._errors = None  # the pending save's error translation (a context manager factory)
        self._files = None  # the pending save's own last step on rank 0 (engine.checkpoint)
        self._megatron = None  # what megatron's finalize steps work with (finalize_parts)
        self._started = 0  # the number of the pending save among those this process started
        self.pending = ""  # the step directory the pending save becomes

    def start(self, request, path: str, errors, files=None, megatron_steps=None) -> None:
        """Forks the writer of `request` (its shards already in host memory when this returns);
        `errors()` turns a failure found when it is finalized into the run's error. `files` (rank
        0's last step: trainer state, rename, `latest`) and `megatron_steps` (finalize_parts) let
        leave() finalize it without megatron's collectives."""
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        assert not self.pending, "one save at a time: finish() the previous one first"
        if self._calls is None:
            self._calls = AsyncCallsQueue(persistent=False)
        self._calls.schedule_async_request(request)
        self._started = next(_SAVES_STARTED)
        self.pending, self._errors, self._files, self._megatron = path, errors, files, megatron_steps

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
            if not self._calls.async_calls:  # its finalize failed, on every rank: nothing is pending any more
                self.pending = ""
            # else stopped before its finalize (a Ctrl-C while waiting for the writer): leave() decides
            raise
        if not done:
            return ""
        self.pending = ""
        return path

    def finish(self) -> str:
        """Waits for the pending save and finalizes it; its step directory ('' if none)."""
        return self.poll(wait=True)

    def leave(self) -> str:
        """For a run that stops with an error while a save is pending; -> the line that tells the
        user which step was kept ('' when none was pending). The save holds the state of a step
        before the error, so it is finished where every rank can take part: each rank that stops
        here says so through the job's key-value store (not a collective: a rank that stopped in
        the middle of a step would pair it with another's collective of that step), and rank 0
        decides, once, "finish" if every rank came within AGREE_S, else "abandon" (a rank waiting
        in a collective for the failed one never comes). Finishing: each rank waits for its writer
        and hands its write results over the store; rank 0 writes what megatron's finalize writes,
        then the trainer state, rename and `latest`. Abandoned (or failing on the way): the writer
        is stopped, so that the process ends now, and the step stays `.partial`."""
        if not self.pending:
            return ""
        final = Path(self.pending)
        try:
            why = self._finish_agreed()
        except Exception as e:  # noqa: BLE001 - the store gone (the job torn down), a write that failed
            why = first_line(e)
        finally:
            self._stop_writer()
        if not why:
            return (f"the checkpoint written in the background when the run stopped was completed: {final} "
                    f"(`latest`: a resume continues from it)")
        from engine import checkpoint

        done = checkpoint.latest(str(final.parent))
        return (f"the checkpoint written in the background when the run stopped was not completed ({why}): "
                f"{final.name}.partial stays in {final.parent}; "
                + (f"the newest complete checkpoint, which a resume continues from, is {done}" if done
                   else "no complete checkpoint was written yet"))

    def _finish_agreed(self) -> str:
        """'' once the pending save is complete, else why it is not."""
        import torch.distributed as dist

        if self._megatron is None or self._files is None:
            return "megatron's finalize steps are not the ones this engine knows"
        rank, world = dist.get_rank(), dist.get_world_size()
        store = dist.distributed_c10d._get_default_store()
        # one key space per save of this process, per restart of the job (torchrun's store outlives those)
        key = f"polar/checkpoint_async/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{self._started}/"
        here = store.add(key + "here", 1)
        deadline = time.monotonic() + AGREE_S
        if rank == 0:
            while here < world and time.monotonic() < deadline:
                time.sleep(0.05)
                here = store.add(key + "here", 0)
            choice = "finish" if here >= world else "abandon"
        else:  # rank 0 decides once it has come; one that never comes cannot finish the save either
            while not store.check([key + "decision"]) and time.monotonic() < deadline + 1.0:
                time.sleep(min(DECISION_POLL_S, max(deadline + 1.0 - time.monotonic(), 0.0)))
            choice = "abandon"
        if store.compare_set(key + "decision", "", choice) != b"finish":  # the first choice made stands
            return f"not every rank stopped within {AGREE_S:.0f} s; a rank still in a step cannot take part"
        writer, global_metadata, directory, config = self._megatron
        for call in self._calls.async_calls:
            if call.async_caller.process is not None:
                call.async_caller.process.join()
        results = writer.retrieve_write_results()
        mine = ("", results) if isinstance(results, list) else (_error_text(results), None)
        store.set(key + f"results{rank}", pickle.dumps(mine))
        if rank == 0:
            try:
                outcome = self._finish_on_rank0(store, key, world, writer, global_metadata, directory, config)
            except Exception as e:  # noqa: BLE001 - told to every rank, which would wait for it otherwise
                outcome = _error_text((e,))
            store.set(key + "outcome", "failed: " + outcome if outcome else "done")
        store.wait([key + "outcome"], datetime.timedelta(seconds=WRITES_S + AGREE_S))
        outcome = store.get(key + "outcome").decode()
        return "" if outcome == "done" else outcome.removeprefix("failed: ")

    def _finish_on_rank0(self, store, key, world, writer, global_metadata, directory, config) -> str:
        from megatron.core.dist_checkpointing.core import save_config

        names = [key + f"results{r}" for r in range(world)]
        store.wait(names, datetime.timedelta(seconds=WRITES_S))
        # one request for them all: a get per rank was as many round trips to the store, one after another
        gathered = [pickle.loads(value) for value in store.multi_get(names)]
        failed = [f"rank {r}: {text}" for r, (text, _) in enumerate(gathered) if text]
        if failed:
            return f"a shard was not written, {failed[0]}"
        writer.finish(global_metadata, [results for _, results in gathered])  # the shards' index, .metadata
        save_config(config, directory)  # metadata.json
        self._files()
        return ""

    def _stop_writer(self) -> None:
        """Ends this rank's writer if it still runs (the interpreter would wait for it at exit) and
        forgets the pending save."""
        for call in self._calls.async_calls:
            process = call.async_caller.process
            if process is not None and process.is_alive():
                process.kill()
            if process is not None:
                process.join()
            call.async_caller.process = None
        self._calls.async_calls.clear()
        self.pending, self._errors, self._files, self._megatron = "", None, None, None


def _error_text(wrapped) -> str:
    """A write error as torch.distributed.checkpoint hands it back (the exception first)."""
    return first_line(wrapped[0])
