"""Feeding packed sequences to the training step: deterministic order, DP sharding, exact resume.

The unit of data is a packed sequence (several whole groups). A global batch is
`train.global_batch` consecutive sequences of a seeded per-epoch permutation, the same for any
data-parallel size; data-parallel rank r takes the r-th contiguous slice of it and cuts it into
micro-batches. Progress is the number of global batches consumed, so a run resumed at any DP size
continues at the exact next sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.packing import Group, PackedBatch, collate, plan_sequences


def per_group_counts(lengths: np.ndarray, n_pos: np.ndarray, n_cand: np.ndarray, prefix_len: np.ndarray,
                     cand_sq_sum: np.ndarray) -> dict:
    """What the training step needs to know of each group before it runs (int64 arrays): tokens,
    groups (1 each), (positive, negative) pairs, positives with a negative (InfoNCE terms),
    next-token targets (every token but the last of the prefix and of each candidate), and the
    (query, key) pairs the shared-prefix mask allows, for exact attention FLOPs: with prefix length P
    and candidate lengths c_k (sum C), P(P+1)/2 + sum_k (c_k P + c_k(c_k+1)/2)
    = P(P+1)/2 + P C + (sum_k c_k^2 + C)/2. `cand_sq_sum` is sum_k c_k^2 per group."""
    cand_total = lengths - prefix_len
    return {
        "tokens": lengths,
        "groups": np.ones(len(lengths), dtype=np.int64),
        "pairs": n_pos * (n_cand - n_pos),
        "positives": np.where(n_cand > n_pos, n_pos, 0),
        "lm_targets": np.maximum(lengths - 1 - n_cand, 0),
        "attention_pairs": (prefix_len * (prefix_len + 1) + cand_sq_sum + cand_total) // 2 + prefix_len * cand_total,
    }


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
        self.per_sequence = {k: np.array([v[p].sum() for p in self.plan], dtype=np.int64) for k, v in per_group.items()}
        self.seq_tokens = self.per_sequence["tokens"]

    def __len__(self) -> int:
        return len(self.plan)

    def sequences(self, indices) -> list[list[Group]]:
        return [[self.groups[g] for g in self.plan[i]] for i in indices]

    @property
    def packing_efficiency(self) -> float:
        return self.num_real_tokens / max(1, len(self.plan) * self.seq_length)


@dataclass
class LoaderState:
    consumed_batches: int = 0


class GlobalBatchLoader:
    """`source` is PackedGroups (built in memory) or engine.indexed_dataset.IndexedDataset (built on
    disk): anything with len, seq_length, sequences(indices) and per_sequence."""

    def __init__(self, source: PackedGroups, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, seed: int, pad_id: int, shuffle: bool = True):
        if len(source) < global_batch:
            raise ValueError(
                f"the data packs into {len(source)} sequences, fewer than train.global_batch={global_batch}"
            )
        self.source = source
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.state = LoaderState()
        self.batches_per_epoch = len(source) // global_batch  # the ragged tail waits for the next epoch
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = len(self.source)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def global_batch_indices(self, batch_number: int) -> np.ndarray:
        epoch, i = divmod(batch_number, self.batches_per_epoch)
        return self._order(epoch)[i * self.global_batch:(i + 1) * self.global_batch]

    def next_microbatches(self) -> list[PackedBatch]:
        """This rank's micro-batches of the next global batch."""
        idx = self.global_batch_indices(self.state.consumed_batches)
        self.last_global = {k: int(v[idx].sum()) for k, v in self.source.per_sequence.items()}
        per_rank = self.global_batch // self.dp_size
        mine = idx[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        self.state.consumed_batches += 1
        return [
            collate(self.source.sequences(mine[j:j + self.micro_batch]), self.source.seq_length, self.pad_id)
            for j in range(0, per_rank, self.micro_batch)
        ]

    @property
    def epoch(self) -> float:
        return self.state.consumed_batches / self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"consumed_batches": self.state.consumed_batches}

    def load_state_dict(self, state: dict) -> None:
        self.state.consumed_batches = int(state["consumed_batches"])
