"""engine.group: what a group accepts, its per-group counts, and that it needs no torch."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.group import Group, per_group_counts
from tests.engine.test_packing import group


def test_group_validation():
    with pytest.raises(ValueError, match="at least 2 candidates"):
        group([1], [[2]], [1])
    with pytest.raises(ValueError, match="needs 2 labels"):
        group([1], [[2], [3]], [1, 0, 0])
    with pytest.raises(ValueError, match="one positive and one negative"):
        group([1], [[2], [3]], [1, 1])
    with pytest.raises(ValueError, match="candidate 1 is empty"):
        group([1], [[2], []], [1, 0])
    with pytest.raises(TypeError, match="integer token ids"):
        Group(np.array([1.5]), [np.array([2]), np.array([3])], np.array([1, 0]))
    # int64 ids (what a Python list becomes) outside int32 would wrap into other, valid ids
    for bad in ([1, 2**32 + 7], [2**31], [-3]):
        with pytest.raises(ValueError, match=r"Group.prefix: token ids must lie in 0..2147483647"):
            Group(np.array(bad, dtype=np.int64), [np.array([2]), np.array([3])], np.array([1, 0]))
    g = group([], [[2], [3, 4]], [0, 1])  # an empty prefix is allowed
    assert len(g) == 3 and g.prefix.dtype == np.int32 and g.labels.dtype == np.int8
    for labels in ([1, 2], [0.5, 1]):
        with pytest.raises(ValueError, match="labels must be 1 \\(positive\\) or 0 \\(negative\\)"):
            group([1], [[2], [3]], labels)


def test_per_group_counts_by_hand():
    # prefix 3, candidates 2 and 1 (labels 1, 0): pairs 1, InfoNCE terms 1, next-token targets
    # 2 + 1 + 0, attention pairs: prefix 3*4/2 = 6, candidate of 2: 2*3 + 3 = 9, of 1: 3 + 1 = 4
    c = per_group_counts(np.array([6]), np.array([1]), np.array([2]), np.array([3]), np.array([2 * 2 + 1 * 1]))
    assert {k: v.tolist() for k, v in c.items()} == {"tokens": [6], "groups": [1], "pairs": [1], "positives": [1],
                                                     "lm_targets": [3], "attention_pairs": [19]}


def test_a_dataset_reader_imports_no_torch():
    """Worker processes of a pass over a dataset's index import the reader: with torch that took
    seconds each."""
    code = ("import sys; sys.path.insert(0, %r); import engine.indexed_dataset, engine.shard_writer, polar.data_stats; "
            "print('torch' in sys.modules)" % str(Path(__file__).parents[2]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
