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
    engine.group.Group for `collate` (which reads prefix, candidates, labels and len), without
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
    lcp = np.array([0] + [_common_prefix(seq[i - 1], seq[i]) for i in range(1, n)], dtype=np.int64)
    ends = np.concatenate([[0], np.cumsum(lens)])  # seq[j:i] holds ends[i] - ends[j] tokens
    # What seq[j] allows a group seq[j:i] (j < i - 1) to share: its common prefix with the next
    # item, and all of itself but its last token.
    step = np.minimum(lcp[1:], lens[:-1] - 1)
    floor = max(min_prefix, 1)
    more = np.arange(1, window)  # k - 1 for the groups seq[i-2:i], seq[i-3:i], ...

    # best[i]: most tokens saved by a partition of seq[:i]; start[i]: where its last group starts.
    # Each i weighs the groups seq[j:i] of its window at once (numpy): a loop over j in Python was
    # O(n * window) interpreter steps, seconds for thousands of rollouts of one prompt.
    best = np.zeros(n + 1, dtype=np.int64)
    start = np.arange(-1, n, dtype=np.int64)  # seq[i-1] alone
    for i in range(2, n + 1):
        best[i] = best[i - 1]
        if min(step[i - 2], lens[i - 1] - 1) < floor:
            continue  # not even seq[i-2:i] shares enough (items of other prompts)
        lo = max(0, i - window)
        shared = np.minimum.accumulate(step[lo:i - 1][::-1])  # j = i-2, i-3, ..., lo
        np.minimum(shared, lens[i - 1] - 1, out=shared)
        k1 = more[:len(shared)]
        fits = (shared >= floor) & (ends[i] - ends[lo:i - 1][::-1] - k1 * shared <= row_tokens)
        # The candidates end at the first j that fails: both tests only fail more further back.
        m = len(fits) if fits.all() else int(np.argmin(fits))
        if m:
            saved = best[lo:i - 1][::-1][:m] + k1[:m] * shared[:m]
            t = int(np.argmax(saved))  # the first maximum: the nearest j among equals
            if saved[t] > best[i]:
                best[i], start[i] = saved[t], i - 2 - t

    groups = []
    i = n
    while i > 0:
        j = int(start[i])
        members = seq[j:i]
        if len(members) == 1:
            shared = len(members[0]) - 1
        else:
            shared = min(int(lcp[j + 1:i].min()), min(len(m) for m in members) - 1)
        groups.append(ServeGroup(prefix=members[0][:shared], candidates=[m[shared:] for m in members],
                                 items=order[j:i]))
        i = j
    groups.reverse()
    return groups


def computed_tokens(groups: list[ServeGroup]) -> int:
    return sum(len(g) for g in groups)
