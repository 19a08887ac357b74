"""engine.shard_format: the per-sequence count columns of the index."""
from __future__ import annotations

import numpy as np


def test_counts_are_the_per_group_counts_of_the_engine():
    from engine.data import per_group_counts
    from engine.shard_format import COUNTS

    assert tuple(per_group_counts(*(np.zeros(0, np.int64),) * 5)) == COUNTS


def test_offsets_are_checked_by_order_not_by_differences_that_wrap():
    """0, 2**62, -2**63 + 2**61, 5: every difference is positive once it wraps around int64."""
    from engine.shard_format import ShardIndex, check_offsets

    def index(piece_tokens):
        return ShardIndex(np.array([0, 1]), np.array([0, 3]), np.array(piece_tokens, np.int64), np.array([-1]),
                          np.array([-1, 1, 0], np.int8), None)

    assert check_offsets(index([0, 2, 3, 5]), 5) is None
    with np.errstate(over="ignore"):
        assert (np.diff(np.array([0, 2**62, -2**63 + 2**61, 5])) > 0).all()
    assert check_offsets(index([0, 2**62, -2**63 + 2**61, 5]), 5) == "piece offsets do not run from 0 to 5"
