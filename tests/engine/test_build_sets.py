"""engine.build_sets: a directory holds each build set of a dataset whole, once."""
from __future__ import annotations

import pytest

from engine.data import PackedGroups
from engine.indexed_dataset import IndexedDataset
from engine.shard_format import DatasetFormatError
from tests.engine.test_indexed_dataset import SEQ, random_groups, write


def build_set(tmp_path, bid: str, n: int, inputs: str = "in", indices=None, prefix: str = "part") -> None:
    for i in range(n) if indices is None else indices:
        write(tmp_path / f"{prefix}-{i:05d}-of-{n:05d}", PackedGroups(random_groups(10 + i, 10), SEQ),
              build={"id": bid, "shard_index": i, "num_shards": n, "inputs": inputs})


def test_complete_build_sets_read_and_incomplete_ones_are_named(tmp_path):
    build_set(tmp_path / "ok", "A", 3)
    build_set(tmp_path / "ok", "B", 2, inputs="other", prefix="b-part")  # another dataset, concatenated
    assert IndexedDataset(tmp_path / "ok").num_groups == 50
    build_set(tmp_path / "gap", "A", 3, indices=[0, 2])
    with pytest.raises(DatasetFormatError, match=r"gap: build A of 3 shards lacks 1 \(part-00001-of-00003; "
                                                 r"present: part-00000-of-00003, part-00002-of-00003\)"):
        IndexedDataset(tmp_path / "gap")


def test_a_shard_twice_or_a_leftover_build_of_the_same_inputs_is_refused(tmp_path):
    build_set(tmp_path / "twice", "A", 2)
    build_set(tmp_path / "twice", "A", 2, indices=[1], prefix="copy")
    with pytest.raises(DatasetFormatError, match=r"twice: shard 1 of 2 of build A is there 2 times "
                                                 r"\(copy-00001-of-00002, part-00001-of-00002\)"):
        IndexedDataset(tmp_path / "twice")
    # an earlier build of the same records with another shard count, left in the directory
    build_set(tmp_path / "leftover", "old", 1)
    build_set(tmp_path / "leftover", "new", 2)
    with pytest.raises(DatasetFormatError, match=r"leftover: the same inputs were built more than once.*"
                                                 r"build old \(part-00000-of-00001\)"):
        IndexedDataset(tmp_path / "leftover")
    # one shard named on its own is read as asked
    assert IndexedDataset(tmp_path / "leftover" / "part-00000-of-00002").num_groups == 10


def test_a_malformed_build_entry_is_named(tmp_path):
    write(tmp_path / "x", PackedGroups(random_groups(4, 10), SEQ), build={"id": "A", "shard_index": 2,
                                                                          "num_shards": 2, "inputs": "in"})
    with pytest.raises(DatasetFormatError, match=r"x\.json: build must be"):
        IndexedDataset(tmp_path)
