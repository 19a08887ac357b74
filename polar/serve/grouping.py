"""Items -> shared-prefix groups: each common id prefix is computed once.

RL trainers score n rollouts per prompt against one reference (paper Sec. 4, RFT), so n POLAR
inputs share "[BOS] prompt \\n reference <|reward|> prompt \\n" and differ only in the rollout. The
engine's packed layout (engine.packing) lets K candidates attend to one stored prefix, giving each
candidate exactly the result it would get alone. The server does not know which items belong
together (the text endpoints receive bare strings, from many requests), so it finds groups from the
ids: sorted lexicographically, items with a long common prefix are neighbours, and a dynamic
program over the sorted order picks the partition into runs that saves the most tokens
(a run of K items sharing P tokens saves (K-1)*P), with each run small enough for one packed row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ServeGroup:
    """A prefix and its candidates, scored in one segment of a packed row. Duck-types
    engine.packing.Group for `collate` (which reads prefix, candidates, labels and len), without
    Group's training checks (two or more candidates with both labels)."""

    prefix: np.ndarray
    candidates: list
    items: list  # index in the batch of each candidate's item
    labels: np.ndarray = None

    def __post_init__(self):
        self.labels = np.zeros(len(self.candidates), dtype=np.int8)  # no pairs: nothing to compare

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(c) for c in self.candidates)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def group_items(ids: list[np.ndarray], row_tokens: int, window: int = 256, min_prefix: int = 32) -> list[ServeGroup]:
    """Partition items (int32 id arrays, each non-empty) into groups sharing their longest common
    prefix; every candidate keeps at least its last token (where the reward is read). A group of
    two or more items holds at most `row_tokens` tokens and shares at least `min_prefix` tokens
    (every item starts with BOS: sharing a few tokens saves nothing worth a longer row); `window`
    bounds the items of one group (and so the dynamic program's cost, O(n * window))."""
    n = len(ids)
    if n == 0:
        return []
    for i, a in enumerate(ids):
        if len(a) == 0:
            raise ValueError(f"item {i} has no tokens: its reward is read at its last token")
    # Big-endian bytes sort like the id sequences themselves.
    order = sorted(range(n), key=lambda i: ids[i].astype(">u4").tobytes())
    seq = [ids[i] for i in order]
    lens = np.array([len(a) for a in seq], dtype=np.int64)
    lcp = [0] + [_common_prefix(seq[i - 1], seq[i]) for i in range(1, n)]

    best = [0] * (n + 1)  # most tokens saved by a partition of seq[:i]
    start = [0] * (n + 1)  # where the last group of that partition starts
    for i in range(1, n + 1):
        best[i], start[i] = best[i - 1], i - 1  # seq[i-1] alone
        shared = int(lens[i - 1]) - 1
        total = int(lens[i - 1])
        for j in range(i - 2, max(-1, i - 1 - window), -1):  # group seq[j:i]
            shared = min(shared, lcp[j + 1], int(lens[j]) - 1)
            if shared < max(min_prefix, 1):
                break  # only shrinks from here, and best[] never decreases: singletons do as well
            total += int(lens[j])
            k = i - j
            if total - (k - 1) * shared > row_tokens:
                break
            if best[j] + (k - 1) * shared > best[i]:
                best[i], start[i] = best[j] + (k - 1) * shared, j

    groups = []
    i = n
    while i > 0:
        j = start[i]
        members = seq[j:i]
        if len(members) == 1:
            shared = len(members[0]) - 1
        else:
            shared = min(min(lcp[j + 1:i]), min(len(m) for m in members) - 1)
        groups.append(ServeGroup(prefix=members[0][:shared], candidates=[m[shared:] for m in members],
                                 items=order[j:i]))
        i = j
    groups.reverse()
    return groups


def computed_tokens(groups: list[ServeGroup]) -> int:
    return sum(len(g) for g in groups)
