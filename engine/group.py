"""A group: one prefix shared by its K candidates, the unit packing never splits, and what the
training step needs to know of groups before it runs. No torch: dataset readers and their worker
processes import this alone (importing torch takes seconds).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _token_ids(x, what: str) -> np.ndarray:
    a = np.asarray(x)
    # An empty list arrives as float64; anything else non-integer is a caller bug, not something to cast.
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"Group.{what} must be a 1-D array of integer token ids, got {a.dtype} with shape {a.shape}")
    # ids wider than int32 (a Python list arrives as int64) past its range would wrap into other,
    # valid-looking ids; narrower ones (what datasets store) cannot, and skip the scan
    if a.size and (a.dtype.itemsize > 4 or a.dtype == np.uint32) and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
        raise ValueError(f"Group.{what}: token ids must lie in 0..{np.iinfo(np.int32).max}, got "
                         f"{a.min()}..{a.max()}")
    return np.ascontiguousarray(a, dtype=np.int32)


@dataclass
class Group:
    """One prefix and its K >= 2 labelled candidates (or K >= 1 unlabelled ones, to score); the unit
    that packing never splits."""

    prefix: np.ndarray  # int32 token ids shared by all candidates
    candidates: list[np.ndarray]  # int32 ids per candidate; the LAST token of each is where its reward is read
    # int8 [K]; 1 = positive, 0 = negative. None: a group to score, not to train on (K >= 1, no pairs)
    labels: np.ndarray | None

    def __post_init__(self):
        self.prefix = _token_ids(self.prefix, "prefix")
        self.candidates = [_token_ids(c, f"candidates[{k}]") for k, c in enumerate(self.candidates)]
        k = len(self.candidates)
        if self.labels is None:
            if k < 1:
                raise ValueError("a group to score needs at least 1 candidate")
            self._check_candidates()
            self.labels = np.zeros(k, dtype=np.int8)  # no positive: no pair, no loss term
            return
        labels = np.asarray(self.labels)
        if k < 2:
            raise ValueError(f"a group needs at least 2 candidates to compare, got {k}")
        if labels.shape != (k,):
            raise ValueError(f"a group with {k} candidates needs {k} labels, got shape {labels.shape}")
        if not ((labels == 0) | (labels == 1)).all():  # np.isin costs ~35 us a call, per group read
            raise ValueError(f"labels must be 1 (positive) or 0 (negative), got {labels.tolist()}")
        # A group without both kinds yields no (positive, negative) pair: its tokens would cost
        # compute and contribute nothing to the loss, which is a data bug worth stopping on.
        if labels.min() == labels.max():
            raise ValueError(f"a group needs at least one positive and one negative candidate, got labels {labels.tolist()}")
        self._check_candidates()
        self.labels = labels.astype(np.int8)

    def _check_candidates(self) -> None:
        for j, c in enumerate(self.candidates):
            if c.size == 0:
                raise ValueError(f"candidate {j} is empty: its reward is read at its last token, so it needs one")

    @classmethod
    def checked(cls, prefix: np.ndarray, candidates: list[np.ndarray], labels: np.ndarray) -> "Group":
        """A group whose parts a reader has already checked as __post_init__ would (int32 ids,
        non-empty candidates, int8 0/1 labels with a positive and a negative): built without
        checking again, which cost a dataset read ~20 us a group."""
        g = cls.__new__(cls)
        g.prefix, g.candidates, g.labels = prefix, candidates, labels
        return g

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(c) for c in self.candidates)


def per_group_counts(lengths: np.ndarray, n_pos: np.ndarray, n_cand: np.ndarray, prefix_len: np.ndarray,
                     cand_sq_sum: np.ndarray) -> dict:
    """What the training step needs to know of each group before it runs (int64 arrays): tokens,
    groups (1 each), (positive, negative) pairs, positives with a negative (InfoNCE terms),
    next-token targets (every token but the last of the prefix, if any, and of each candidate), and the
    (query, key) pairs the shared-prefix mask allows, for exact attention FLOPs: with prefix length P
    and candidate lengths c_k (sum C), P(P+1)/2 + sum_k (c_k P + c_k(c_k+1)/2)
    = P(P+1)/2 + P C + (sum_k c_k^2 + C)/2. `cand_sq_sum` is sum_k c_k^2 per group."""
    cand_total = lengths - prefix_len
    return {
        "tokens": lengths,
        "groups": np.ones(len(lengths), dtype=np.int64),
        "pairs": n_pos * (n_cand - n_pos),
        "positives": np.where(n_cand > n_pos, n_pos, 0),
        # an empty prefix has no last token to leave out: every candidate token but its last is a target
        "lm_targets": lengths - n_cand - (prefix_len > 0),
        "attention_pairs": (prefix_len * (prefix_len + 1) + cand_sq_sum + cand_total) // 2 + prefix_len * cand_total,
    }
