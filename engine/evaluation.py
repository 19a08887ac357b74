"""Evaluation of a packed set by the training engine (Trainer.evaluate): pairwise accuracy and loss over
every group, forward only, the data-parallel ranks sharing the set. The periodic evaluation inside
Trainer.fit (train.eval_interval) stops between its batches at a stop request (SIGTERM, train.stop_file):
at scale it takes minutes, more than the grace a SIGTERM leaves before SIGKILL (Kubernetes' 30 s by
default), and the checkpoint save, which the stop is for, would otherwise start only after it. For the
same minutes the main rank prints the evaluation's progress, rate and ETA every PROGRESS_S seconds.
As training's batches are (engine/data.py GlobalBatchLoader), each chunk of batches is read and collated
on a background thread, in pinned memory on CUDA, while the device runs the chunk before."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from engine.data import _use_device
from engine.packing import collate
from engine.progress import RateLine

STATS = 6  # per-batch sums: loss_sum, correct_pairs, loss_count, pairs, lm_loss_sum, lm_targets
EVAL_CHUNK = 16  # evaluation micro-batches collated and run per schedule call (times pp): one batch
# seconds between the main rank's progress lines of an evaluation (minutes long at scale); one that
# ends sooner prints none
PROGRESS_S = 10.0


class EvaluationStopped(Exception):
    """A stop request (`request`: "SIGTERM" or "stop_file") came during an evaluation: every rank left it
    before the same batch, `done` of `total` run. Nothing of it is reported (see evaluate_all)."""

    def __init__(self, request: str, done: int, total: int):
        super().__init__(f"{request}: evaluation stopped after {done} of {total} batches")
        self.request, self.done, self.total = request, done, total


@torch.no_grad()
def evaluate(trainer, data, stop_check: Callable[[], str] | None = None, read_ahead: bool = True) -> dict:
    """Pairwise accuracy and loss over every group of `data` (forward only, DP ranks share).

    Streams: EVAL_CHUNK x pp micro-batches are collated and run per schedule call, so memory does not
    grow with the evaluation set. Each call runs a multiple of pp micro-batches (one sequence each:
    stages exchange fixed-shape activations), padded with empty sequences, as megatron's interleaved
    schedule requires; an empty sequence holds no candidate and adds nothing. With `read_ahead` the
    next call's batches are read and collated on a second thread while this one runs (the host holds
    two calls' batches); they are the same batches either way.

    `stop_check` (every rank passes one, or none does) is asked before each batch and returns the same
    on every rank (an agreement: a collective over several ranks): a non-empty answer raises
    EvaluationStopped there. So every rank makes the same number of calls, also a data-parallel rank
    whose share of the set is a batch shorter (it asks, and runs nothing).
    """
    trainer._finish_param_sync()
    rt = trainer.rt
    mine = np.arange(rt.dp_rank, len(data), rt.dp)
    chunk_size = EVAL_CHUNK * rt.pp
    total = -(-len(range(0, len(data), rt.dp)) // chunk_size)  # the largest share's batches
    seq = data.seq_length
    # non_blocking copies (PackedBatch.to) are asynchronous from pinned memory only: from pageable
    # memory the host stages them itself, waiting on the device
    pin = rt.device if rt.is_cuda else None

    def batches_of(done: int) -> list:
        part = mine[done * chunk_size:(done + 1) * chunk_size]
        batches = [collate(data.sequences([i]), seq, trainer.pad_id) for i in part]
        batches += [collate([[]], seq, trainer.pad_id)] * ((-len(batches)) % rt.pp)
        return [b.pin_memory() for b in batches] if pin is not None else batches

    reader = None
    for chunk in trainer.model:
        chunk.eval()
    try:
        if read_ahead and total:
            # the current CUDA device is per thread: set on the reader's, as training's loader does
            reader = ThreadPoolExecutor(1, thread_name_prefix="eval-read-ahead",
                                        **({"initializer": _use_device, "initargs": (pin,)} if pin is not None else {}))
        stats = torch.zeros(STATS, device=rt.device)
        # the set's name: the periodic evaluation and engine/pretrain.py's final one pass the trainer's sets
        name = next((k for k, v in trainer.evals.items() if v is data), "")
        shown = RateLine(f"evaluating {name}".rstrip(), len(data), "packed sequences", "seq/s", trainer.log,
                         PROGRESS_S)
        pending = reader.submit(batches_of, 0) if reader is not None else None
        for done in range(total):
            # an error reading or collating a batch is raised here, where the batch is needed
            batches = pending.result() if pending is not None else batches_of(done)
            if reader is not None and done + 1 < total:
                # before the stop check: the collation overlaps this batch's device work, and the
                # device work before it that the check's host copy waits for
                pending = reader.submit(batches_of, done + 1)
            request = stop_check() if stop_check else ""
            if request:
                raise EvaluationStopped(request, done, total)
            if batches:
                stats += trainer._sum_stats(trainer._run_schedule(batches, forward_only=True, micro_batch=1,
                                                              seq_length=seq))
            # every data-parallel rank has run as many batches (the last short on some): the set's count
            shown.update(min(len(data), (done + 1) * chunk_size * rt.dp))
    finally:
        if reader is not None:  # joined on every way out: a stop, an error, the end (waits out one collation)
            reader.shutdown(wait=True, cancel_futures=True)
        for chunk in trainer.model:
            chunk.train()
    s = trainer._reduce(stats).tolist()
    out = {"loss": s[0] / max(s[2], 1), "pair_accuracy": s[1] / max(s[3], 1), "pairs": int(s[3])}
    if s[5] > 0:
        out["lm_loss"] = s[4] / s[5]
    return out
