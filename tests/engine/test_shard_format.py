"""engine.shard_format: the per-sequence count columns of the index."""
from __future__ import annotations

import numpy as np


def test_counts_are_the_per_group_counts_of_the_engine():
    from engine.data import per_group_counts
    from engine.shard_format import COUNTS

    assert tuple(per_group_counts(*(np.zeros(0, np.int64),) * 5)) == COUNTS
