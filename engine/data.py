"""Feeding packed sequences to the training step: deterministic order, DP sharding, exact resume.

The unit of data is a packed sequence (several whole groups). The order is one stream of seeded
per-epoch permutations laid end to end, and a global batch is the next `train.global_batch`
sequences of it, the same for any data-parallel size; data-parallel rank r takes the r-th
contiguous slice of it and cuts it into micro-batches. An epoch's last batch is filled from the
start of the next epoch's permutation, so no sequence is ever dropped. Progress is the number of
global batches consumed: batch b is a pure function of b, so a run resumed at any DP size
continues at the exact next sequence.
"""
from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from engine.config import ConfigError
from engine.group import Group, per_group_counts
from engine.packing import PackedBatch, collate, plan_sequences


class PackedGroups:
    """Groups held in memory, packed once into sequences of `seq_length` tokens."""

    def __init__(self, groups: list[Group], seq_length: int, method: str = "best_fit"):
        self.groups = groups
        self.seq_length = seq_length
        lengths = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
        self.plan = plan_sequences(lengths, seq_length, method=method)
        self.num_real_tokens = int(lengths.sum())
        # Per packed sequence, known on the host before a step runs: throughput accounting and the
        # global loss normalisers need no device round trip.
        n_pos = np.fromiter((int((g.labels == 1).sum()) for g in groups), dtype=np.int64, count=len(groups))
        n_cand = np.fromiter((len(g.candidates) for g in groups), dtype=np.int64, count=len(groups))
        prefix_len = np.fromiter((len(g.prefix) for g in groups), dtype=np.int64, count=len(groups))
        cand_sq = np.fromiter((sum(len(c) ** 2 for c in g.candidates) for g in groups), dtype=np.int64,
                              count=len(groups))
        per_group = per_group_counts(lengths, n_pos, n_cand, prefix_len, cand_sq)
        # summed per sequence in one pass per key (not a Python loop over the sequences)
        order = np.concatenate(self.plan) if self.plan else np.zeros(0, dtype=np.int64)
        seq_of = np.repeat(np.arange(len(self.plan)), [len(p) for p in self.plan])
        self.per_sequence = {}
        for k, v in per_group.items():
            sums = np.zeros(len(self.plan), dtype=np.int64)
            np.add.at(sums, seq_of, np.asarray(v, dtype=np.int64)[order])
            self.per_sequence[k] = sums
        self.seq_tokens = self.per_sequence["tokens"]

    def __len__(self) -> int:
        return len(self.plan)

    def sequences(self, indices) -> list[list[Group]]:
        return [[self.groups[g] for g in self.plan[i]] for i in indices]

    @property
    def packing_efficiency(self) -> float:
        return self.num_real_tokens / max(1, len(self.plan) * self.seq_length)

    def tokens_digest(self) -> str:
        """A fingerprint of every token id and label in packed order, so that a resume notices records
        edited in place (the per-sequence counts do not change when a text keeps its length). O(tokens):
        data held in memory only, which is small (fine-tuning sets, the embedded default)."""
        if getattr(self, "_tokens_digest", None) is None:
            h = hashlib.sha1()
            for seq in self.plan:
                for g in seq:
                    group = self.groups[g]
                    parts = [group.prefix, *group.candidates]
                    h.update(np.array([len(a) for a in parts], dtype=np.int64).tobytes())
                    for a in parts:
                        h.update(a.tobytes())
                    if group.labels is not None:
                        h.update(group.labels.tobytes())
            self._tokens_digest = h.hexdigest()[:16]
        return self._tokens_digest


def counts_digest(source) -> str:
    """A fingerprint of a packed set: every sequence's token, group and attention counts, in order.
    Other records (another held-out split, another build) that pack into as many sequences still
    change it; it reads no token ids, so it costs O(sequences): ~0.5 s per 10^7 sequences, ~10 s a
    rank at POLAR's 2*10^8. Taken once per set: kept on the set (which does not change under a run),
    as a resume asks for it twice on every rank (the entry script's check of the loader state, then
    the trainer's), and the evaluation sets' at the trainer's start and again at its resume."""
    kept = getattr(source, "_counts_digest", None)
    if kept is not None:
        return kept
    h = hashlib.sha1()
    for key in sorted(source.per_sequence):
        h.update(key.encode())
        # as int64, a piece at a time: the same digest as the whole column's bytes, without an
        # int64 copy of it (1.6 GB a column at 2*10^8 sequences, where they are kept narrower)
        col = source.per_sequence[key]
        for at in range(0, len(col), 1 << 20):
            h.update(np.ascontiguousarray(col[at:at + (1 << 20)], dtype=np.int64))
    digest = h.hexdigest()[:16]
    try:
        source._counts_digest = digest
    except AttributeError:  # a set without a __dict__ (slots): taken again when asked again
        pass
    return digest


def set_digest(source) -> str:
    """The digests a resume compares of a packed set, as the training data's: counts_digest, and the
    token digest of a set held in memory (PackedGroups.tokens_digest: records edited in place)."""
    tokens = getattr(source, "tokens_digest", None)
    return counts_digest(source) + (f"-{tokens()}" if tokens is not None else "")


def _use_device(device) -> None:
    # the current CUDA device is per thread: pinning from a thread left on device 0 would make every
    # rank of a node create a context on GPU 0
    import torch

    torch.cuda.set_device(device)


@dataclass
class LoaderState:
    consumed_batches: int = 0


class GlobalBatchLoader:
    """`source` is PackedGroups (built in memory) or engine.indexed_dataset.IndexedDataset (built on
    disk): anything with len, seq_length, sequences(indices) and per_sequence (thread-safe reads).

    Each batch is read and collated by one background thread, the next one while the current step
    runs, so neither the shard reads nor the collation sit between two steps; with `pin_memory` (the
    step's CUDA device) its tensors are page-locked there, so the step's host-to-device copies are
    asynchronous. Batch b being a pure function of b, prefetching changes no batch."""

    def __init__(self, source: PackedGroups, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int, pad_id: int, shuffle: bool = True, pin_memory=None):
        if len(source) < global_batch:
            # a setting the run cannot honour; the entry script prints it once, without a traceback
            raise ConfigError(
                f"train.global_batch={global_batch}: the data packs into only {len(source)} sequences"
            )
        self.source = source
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.pin_memory = pin_memory
        self.state = LoaderState()
        self._orders: dict[int, np.ndarray] = {}
        self._orders_lock = threading.Lock()  # the step's thread and the reading thread both ask
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: dict[int, Future] = {}  # batch number -> its micro-batches, being read

    def _order(self, epoch: int) -> np.ndarray:
        with self._orders_lock:
            if epoch not in self._orders:
                n = len(self.source)
                # Generator.permutation(n) is a shuffle of arange(n): shuffled in place as int32, the same
                # order in half the memory (every rank holds up to three) and no int64 copy on the way
                # (1.6 GB at POLAR's ~2*10^8 packed sequences)
                order = np.arange(n, dtype=np.int32 if n <= np.iinfo(np.int32).max else np.int64)
                if self.shuffle:
                    np.random.default_rng([self.seed, epoch]).shuffle(order)
                # a batch spans at most two epochs (global_batch <= len): two orders serve any batch; an
                # older one stays too, for a prefetch of the next batch crossing into a newer epoch
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 2}
                self._orders[epoch] = order
            return self._orders[epoch]

    def global_batch_indices(self, batch_number: int) -> np.ndarray:
        """Positions b*G .. b*G+G-1 of the stream; position p is sequence order_{p // N}[p % N]."""
        n = len(self.source)
        first, last = divmod(batch_number * self.global_batch, n), divmod((batch_number + 1) * self.global_batch - 1, n)
        if first[0] == last[0]:
            return self._order(first[0])[first[1]:last[1] + 1]
        return np.concatenate([self._order(first[0])[first[1]:], self._order(last[0])[:last[1] + 1]])

    def microbatches(self, batch_number: int) -> list[PackedBatch]:
        """This rank's micro-batches of global batch `batch_number` (read now, in this thread)."""
        idx = self.global_batch_indices(batch_number)
        per_rank = self.global_batch // self.dp_size
        mine = idx[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        batches = [
            collate(self.source.sequences(mine[j:j + self.micro_batch]), self.source.seq_length, self.pad_id)
            for j in range(0, per_rank, self.micro_batch)
        ]
        return [b.pin_memory() for b in batches] if self.pin_memory is not None else batches

    def _read(self, batch_number: int) -> Future:
        if batch_number not in self._ahead:
            if self._reader is None:
                # the initializer must not be a method: the idle thread keeps it, and with it the loader
                self._reader = ThreadPoolExecutor(
                    1, thread_name_prefix="batch-reader",
                    **({"initializer": _use_device, "initargs": (self.pin_memory,)} if self.pin_memory is not None else {}))
            self._ahead[batch_number] = self._reader.submit(self.microbatches, batch_number)
        return self._ahead[batch_number]

    def next_microbatches(self, prefetch: bool = True) -> list[PackedBatch]:
        """This rank's micro-batches of the next global batch; with `prefetch` (unless the run ends
        with this batch) the reading thread starts on the one after. An error reading a batch is
        raised here, by the step that needs it. Without `prefetch` a batch not read ahead is read in
        this thread."""
        number = self.state.consumed_batches
        pending = self._ahead.pop(number, None)
        if pending is None and prefetch:
            pending = self._read(number)
            del self._ahead[number]
        if prefetch:
            self._read(number + 1)
        batches = pending.result() if pending is not None else self.microbatches(number)
        idx = self.global_batch_indices(number)
        self.last_global = {k: int(v[idx].sum()) for k, v in self.source.per_sequence.items()}
        self.state.consumed_batches += 1
        return batches

    def close(self) -> None:
        """Stops the reading thread (after the batch it is reading, if any)."""
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead.clear()
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None

    @property
    def epoch(self) -> float:
        return self.state.consumed_batches * self.global_batch / len(self.source)

    def state_dict(self) -> dict:
        # with the settings the order is a function of: a resume that changed one would continue
        # another order at the same batch number, skipping or repeating sequences
        return {"consumed_batches": self.state.consumed_batches, "global_batch": self.global_batch,
                "seed": self.seed, "shuffle": self.shuffle, "sequences": len(self.source),
                "data_digest": self.data_digest(),
                **({"tokens_digest": self.source.tokens_digest()} if hasattr(self.source, "tokens_digest") else {})}

    def data_digest(self) -> str:
        """counts_digest of the training data (taken once per set, whichever loader asks: at scale
        every rank saves it with every checkpoint)."""
        return counts_digest(self.source)

    def load_state_dict(self, state: dict, data: str = "the training data") -> None:
        """Refuses (ConfigError) a state saved with another data order; a state that records none
        (saved before the order's settings were) is taken as it is. `data` names the training data in
        the message (the entry script knows which setting gives it)."""
        now = {"global_batch": ("train.global_batch", self.global_batch), "seed": ("train.seed", self.seed),
               "shuffle": ("the loader's shuffle", self.shuffle),
               "sequences": ("its packed sequence count", len(self.source)),
               "data_digest": ("a digest of its packed sequences' token counts", self.data_digest())}
        changed = {key: f"{name}: {state[key]} when saved, {value} now" for key, (name, value) in now.items()
                   if key in state and state[key] != value}
        # the data named once, before its figures: named before each, a changed finetune.train was named
        # twice in one refusal
        figures = [changed.pop(key) for key in ("sequences", "data_digest") if key in changed]
        changed = list(changed.values()) + ([f"{data}, {'; '.join(figures)}"] if figures else [])
        if changed:
            raise ConfigError(f"the data order changed since the checkpoint ({'; '.join(changed)}): resuming would "
                              "skip or repeat sequences; set it back, or start a new run (a new run_dir) from the "
                              "checkpoint's weights (checkpoint.init_from)")
        if "tokens_digest" in state and hasattr(self.source, "tokens_digest"):
            now_tokens = self.source.tokens_digest()
            if state["tokens_digest"] != now_tokens:
                raise ConfigError(f"{data} changed since the checkpoint: the same number of packed "
                                  f"sequences with the same token counts, but other token ids or labels (digest "
                                  f"{state['tokens_digest']} when saved, {now_tokens} now; a record edited in "
                                  "place?); resuming would train on data the run's first steps never saw in that "
                                  "order; restore the data, or start a new run (a new run_dir) from the "
                                  "checkpoint's weights (checkpoint.init_from)")
        self.close()  # batches read ahead for the old position
        self.state.consumed_batches = int(state["consumed_batches"])
