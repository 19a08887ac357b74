"""engine.indexed_dataset: what the reader refuses and names (a damaged, cut or replaced shard, shards that
disagree, values the engine cannot train on), and how it reads a shard's files without mapping them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.data import PackedGroups
from engine.indexed_dataset import IndexedDataset
from engine.packing import Group
from engine.shard_format import DatasetFormatError, DatasetTokenError
from tests.engine.test_indexed_dataset import SEQ, random_groups, same_groups, write


@pytest.fixture
def packed():
    return PackedGroups(random_groups(0, 120), SEQ)


@pytest.mark.parametrize("damage,needle", [
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]), "p.bin: "),
    (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-5]), "p.idx: "),
    (lambda p: p.with_suffix(".idx").write_bytes(b"X" * 8 + p.with_suffix(".idx").read_bytes()[8:]), "magic"),
    (lambda p: p.with_suffix(".idx").write_bytes(b"short"), "shorter than"),
    (lambda p: p.with_suffix(".bin").unlink(), "p.bin: missing"),
])
def test_damaged_shards_are_named(tmp_path, packed, damage, needle):
    write(tmp_path / "p", packed)
    damage(tmp_path / "p")
    with pytest.raises(DatasetFormatError, match=needle):
        IndexedDataset(tmp_path)


@pytest.mark.parametrize("suffix", [".idx", ".bin", ".json"])
def test_a_shard_named_by_one_of_its_files_is_told_its_name(tmp_path, packed, suffix):
    # `polar data stats ds/p.idx` said only "no such dataset directory or shard", of a file that exists
    write(tmp_path / "p", packed)
    with pytest.raises(DatasetFormatError, match=f"a shard is named without its suffix: {tmp_path / 'p'}\\)"):
        IndexedDataset(tmp_path / f"p{suffix}")
    assert IndexedDataset(tmp_path / "p").seq_length == packed.seq_length


def test_shards_must_agree_and_a_dataset_must_exist(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such dataset"):
        IndexedDataset(tmp_path / "nothing")
    with pytest.raises(DatasetFormatError, match="no shards"):
        IndexedDataset(tmp_path)
    write(tmp_path / "a", PackedGroups(random_groups(4, 20), SEQ))
    write(tmp_path / "b", PackedGroups(random_groups(4, 20), 2 * SEQ))
    with pytest.raises(DatasetFormatError, match="seq_length 128 differs"):
        IndexedDataset(tmp_path)


def test_shards_must_agree_on_bos_but_not_on_the_tokenizers_path(tmp_path):
    write(tmp_path / "a", PackedGroups(random_groups(4, 10), SEQ), bos_id=0, tokenizer="/tok/a")
    write(tmp_path / "b", PackedGroups(random_groups(5, 10), SEQ), bos_id=0, tokenizer="/elsewhere/a")
    assert IndexedDataset(tmp_path).num_groups == 20
    write(tmp_path / "c", PackedGroups(random_groups(6, 10), SEQ), bos_id=2)
    with pytest.raises(DatasetFormatError, match="bos_id 2 differs"):
        IndexedDataset(tmp_path)


def test_shards_of_two_tokenizers_of_one_size_are_refused_where_both_record_theirs(tmp_path):
    """Two BPEs trained apart, of one size and with the same special ids, passed the id checks: a directory
    holding a build of each trained on two meanings of every id. Their content digests tell them apart (a
    shard written before the digest was recorded is not compared on it)."""
    write(tmp_path / "a", PackedGroups(random_groups(4, 10), SEQ), bos_id=0, tokenizer_digest="d1", reward_token_id=9)
    write(tmp_path / "b", PackedGroups(random_groups(5, 10), SEQ), bos_id=0, tokenizer_digest="d1", reward_token_id=9)
    write(tmp_path / "c", PackedGroups(random_groups(6, 10), SEQ), bos_id=0)  # recorded neither
    assert IndexedDataset(tmp_path).num_groups == 30
    write(tmp_path / "d", PackedGroups(random_groups(7, 10), SEQ), bos_id=0, tokenizer_digest="d2", reward_token_id=9)
    with pytest.raises(DatasetFormatError, match=r"/d: tokenizer_digest d2 differs from .*/a's d1 \(another tokenizer"):
        IndexedDataset(tmp_path)
    write(tmp_path / "d", PackedGroups(random_groups(7, 10), SEQ), bos_id=0, tokenizer_digest="d1", reward_token_id=8)
    with pytest.raises(DatasetFormatError, match="/d: reward_token_id 8 differs from .*/a's 9"):
        IndexedDataset(tmp_path)


# ---- a damaged index: found when its sequence is read, by verify(), and at open in version 1 ---------

def poke(stem: Path, array: int, element: int, value: int) -> None:
    """Writes `value` into element `element` of index array `array` (the order of the module
    docstring; 5 is the per-sequence counts, column-major) of the shard at `stem`."""
    from engine.indexed_dataset import _Shard
    from engine.shard_files import OpenFiles

    start, end, dtype = _Shard(stem.with_suffix(".idx"), OpenFiles())._layout[array]
    m = np.memmap(stem.with_suffix(".idx"), dtype=dtype, mode="r+", offset=start,
                  shape=((end - start) // dtype.itemsize,))
    m[element] = value
    m.flush()
    del m


def a_sequence_of_several_groups(packed) -> tuple[int, int]:
    """(sequence, the index of its second group) for a sequence holding at least two groups."""
    j = next(j for j, plan in enumerate(packed.plan) if j > 0 and len(plan) >= 2)
    return j, sum(len(p) for p in packed.plan[:j]) + 1


def test_a_damaged_group_offset_stops_the_read_of_its_sequence_only(tmp_path, packed):
    """Opening reads O(sequences) of the index, so a damaged group offset is not seen then; the
    sequence holding it is refused when read (the file and sequence named), the others read as
    written, and verify() finds it. A version-1 index, read whole at open, is refused there."""
    from benchmarks.dataset_open import as_version_1

    j, g = a_sequence_of_several_groups(packed)
    write(tmp_path / "p", packed)
    poke(tmp_path / "p", 1, g, 10**9)
    ds = IndexedDataset(tmp_path / "p")
    with pytest.raises(DatasetFormatError, match=rf"p\.idx: packed sequence {j}: group offsets out of order"):
        ds.sequences([j])
    others = [i for i in range(len(ds)) if i != j]
    same_groups(ds.sequences(others), packed.sequences(others))
    with pytest.raises(DatasetFormatError, match=r"p\.idx: group offsets do not run from 0"):
        ds.verify()
    as_version_1(tmp_path / "p.idx")
    with pytest.raises(DatasetFormatError, match=r"p\.idx: group offsets do not run from 0"):
        IndexedDataset(tmp_path / "p")


def test_a_damaged_label_or_count_is_named_with_its_sequence(tmp_path, packed):
    j, g = a_sequence_of_several_groups(packed)
    first_piece = sum(1 + len(packed.groups[x].candidates) for p in packed.plan[:j] for x in p)
    write(tmp_path / "lab", packed)
    poke(tmp_path / "lab", 4, first_piece, 1)  # the sequence's first prefix labelled as a candidate
    with pytest.raises(DatasetFormatError, match=rf"packed sequence {j}: piece labels are not -1 on prefixes"):
        IndexedDataset(tmp_path / "lab").sequences([j])

    S, pairs = len(packed), list(packed.per_sequence).index("pairs")
    write(tmp_path / "cnt", packed)
    wrong = int(packed.per_sequence["pairs"][j]) + 1
    poke(tmp_path / "cnt", 5, pairs * S + j, wrong)
    ds = IndexedDataset(tmp_path / "cnt")
    assert ds.per_sequence["pairs"][j] == wrong  # what the run plans with until it reads the sequence
    with pytest.raises(DatasetFormatError, match=rf"packed sequence {j}: its pairs count is {wrong}, its groups "
                                                 rf"hold {wrong - 1}"):
        ds.sequences([j])
    with pytest.raises(DatasetFormatError, match=rf"packed sequence {j}: its pairs count is {wrong}.*\(1 sequence"):
        ds.verify()

    write(tmp_path / "tok", packed)  # token and group counts are checked against the index at open
    poke(tmp_path / "tok", 5, j, int(packed.per_sequence["tokens"][j]) + 1)
    with pytest.raises(DatasetFormatError, match=r"tok\.idx: per-sequence counts disagree with the index"):
        IndexedDataset(tmp_path / "tok")


# ---- nothing is mapped: positional reads ---------------------------------------------------------

def test_nothing_is_mapped_and_a_file_cut_short_is_named(tmp_path, packed):
    """A page fault reads around the page (read-ahead), many times a sequence's bytes on data larger
    than the page cache: index and token files are read with positional reads, neither is mapped
    (verify maps an index for its one pass, and lets it go)."""
    write(tmp_path / "p", packed)
    ds = IndexedDataset(tmp_path / "p")
    same_groups(ds.sequences(range(len(ds))), packed.sequences(range(len(packed))))
    ds.verify()
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / "p.idx") not in maps and str(tmp_path / "p.bin") not in maps
    assert sorted(f.name for f in ds._files._files) == ["p.bin", "p.idx"]
    bin_path = tmp_path / "p.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])  # the open file now ends a token early
    with pytest.raises(DatasetFormatError, match=r"p\.bin: ends at byte .* \(truncated since it was opened\?\)"):
        ds.sequences([len(ds) - 1])


def test_a_sequences_pieces_view_one_int32_array(tmp_path, packed):
    """uint16 tokens on disk are widened once per sequence, not once per piece, and the groups are
    the engine's (what Group would build from the same parts)."""
    write(tmp_path / "p", packed)
    ds = IndexedDataset(tmp_path / "p")
    assert ds.shards[0].dtype == np.uint16
    j = max(range(len(ds)), key=lambda j: len(packed.plan[j]))
    groups = ds.sequences([j])[0]
    pieces = [p for g in groups for p in (g.prefix, *g.candidates)]
    assert len(groups) >= 2 and all(p.dtype == np.int32 and p.flags.c_contiguous for p in pieces)
    assert len({id(p.base) for p in pieces}) == 1 and pieces[0].base is not None
    for g in groups:
        rebuilt = Group(prefix=g.prefix, candidates=g.candidates, labels=g.labels)
        same_groups([[g]], [[rebuilt]])
        assert g.labels.dtype == rebuilt.labels.dtype == np.int8


# ---- damaged or replaced files the checks above let through ------------------------------------------

def write_counts(stem: Path, counts: dict) -> None:
    """Overwrites per-sequence count columns of the shard at `stem` ({key: values}) in one write, so
    that no check runs between two damaged columns."""
    from engine.indexed_dataset import _Shard
    from engine.shard_files import OpenFiles
    from engine.shard_format import COUNTS

    start, end, dtype = _Shard(stem.with_suffix(".idx"), OpenFiles())._layout[5]
    m = np.memmap(stem.with_suffix(".idx"), dtype=dtype, mode="r+", offset=start,
                  shape=(len(COUNTS), (end - start) // dtype.itemsize // len(COUNTS)))
    for key, values in counts.items():
        m[COUNTS.index(key)] = values
    m.flush()
    del m


def recount(stem: Path, packed: PackedGroups, j: int, groups: list[tuple]) -> None:
    """Makes sequence j's counts agree with what its damaged index now describes, `groups` of
    (prefix length, candidate lengths, labels): a damage the counts do not give away. A label below
    0 is not a candidate's (as check_sequence counts)."""
    from engine.data import per_group_counts

    cols = {k: np.array(v, np.int64) for k, v in packed.per_sequence.items()}
    per_group = per_group_counts(
        np.array([p + sum(c) for p, c, _ in groups]), np.array([sum(x == 1 for x in lab) for _, _, lab in groups]),
        np.array([len(c) for _, c, _ in groups]), np.array([p for p, _, _ in groups]),
        np.array([sum(n * n for n, x in zip(c, lab) if x >= 0) for _, c, lab in groups]))
    for k, v in per_group.items():
        cols[k][j] = int(v.sum())
    write_counts(stem, cols)


def described(packed: PackedGroups, j: int) -> tuple[int, list]:
    """(the first piece of sequence j, its groups as recount takes them)."""
    first = sum(1 + len(packed.groups[g].candidates) for p in packed.plan[:j] for g in p)
    return first, [(len(g.prefix), [len(c) for c in g.candidates], g.labels.tolist())
                   for g in (packed.groups[i] for i in packed.plan[j])]


def refused_when_read_and_by_verify(ds: IndexedDataset, j: int, problem: str) -> None:
    """Reading sequence j of the one-shard dataset at p names the shard, the sequence and `problem`;
    verify() names the shard and `problem`."""
    with pytest.raises(DatasetFormatError, match=rf"p\.idx: packed sequence {j}: {problem}"):
        ds.sequences([j])
    with pytest.raises(DatasetFormatError, match=rf"p\.idx: {problem}"):
        ds.verify()


@pytest.mark.parametrize("replaced", [".idx", ".bin"])
def test_a_shard_replaced_on_disk_while_open_is_refused_not_read(tmp_path, replaced):
    """What was checked at open (sequence offsets, counts, sizes) holds for the files then opened: a
    shard rebuilt under an open dataset (the same records in another order: files of the same
    sizes) is refused when its files are opened again, not read under the old counts and order."""
    groups = random_groups(0, 120)
    a = PackedGroups(groups, SEQ)
    write(tmp_path / "ds" / "a", a)
    write(tmp_path / "ds" / "b", PackedGroups(random_groups(1, 50), SEQ))
    write(tmp_path / "new" / "a", PackedGroups(groups[::-1], SEQ))
    ds = IndexedDataset(tmp_path / "ds")
    ds._files.size = 2
    ds.sequences([0]), ds.sequences([len(a)])  # a's files are dropped from the open ones
    old, new = tmp_path / "ds" / f"a{replaced}", tmp_path / "new" / f"a{replaced}"
    assert old.stat().st_size == new.stat().st_size and old.read_bytes() != new.read_bytes()
    new.replace(old)
    with pytest.raises(DatasetFormatError, match=rf"a\{replaced}: replaced or rewritten since the dataset was opened"):
        ds.sequences(range(len(a)))


@pytest.mark.parametrize("dtype", [b"zz", b"\xff\xfe", b"<f2", b"V2", b"<i2", b"O"])
def test_a_header_naming_no_token_dtype_is_named(tmp_path, packed, dtype):
    """The header's token dtype is one the writer writes (uint16 or int32), else the index is refused
    at open: a float or void dtype would be read as tokens, int16 would turn ids >= 32768 negative."""
    write(tmp_path / "p", packed)
    with open(tmp_path / "p.idx", "r+b") as f:
        f.seek(16)
        f.write(dtype.ljust(8, b"\0"))
    with pytest.raises(DatasetFormatError, match=r"p\.idx: token dtype .*, expected uint16 or int32"):
        IndexedDataset(tmp_path / "p")


def test_token_counts_past_seq_length_are_refused_at_open(tmp_path, packed):
    """The token counts add up to the shard's tokens, and each fits seq_length: counts that wrap
    around int64 add up too, and the run would plan with them until it read their sequences."""
    T, tokens = packed.num_real_tokens, np.array(packed.per_sequence["tokens"], np.int64)
    wrapped = tokens.copy()
    wrapped[:3] = 2**63 - 1, 2**63 - 1, T - int(tokens[3:].sum()) + 2  # sums to T modulo 2**64
    moved = tokens.copy()
    moved[0], moved[1] = SEQ + 1, tokens[0] + tokens[1] - SEQ - 1
    assert moved[1] >= 0
    for name, column in (("wrapped", wrapped), ("moved", moved)):
        write(tmp_path / name, packed)
        write_counts(tmp_path / name, {"tokens": column})
        with pytest.raises(DatasetFormatError, match=rf"{name}\.idx: packed sequence 0: its tokens count is "
                                                     rf"{column[0]}, more than seq_length {SEQ}"):
            IndexedDataset(tmp_path / name)


def test_a_label_below_minus_1_is_refused_even_where_the_counts_agree(tmp_path, packed):
    j = 3
    first, groups = described(packed, j)
    k = groups[0][2].index(0)
    groups[0][2][k] = -5
    write(tmp_path / "p", packed)
    poke(tmp_path / "p", 4, first + 1 + k, -5)
    recount(tmp_path / "p", packed, j, groups)
    refused_when_read_and_by_verify(IndexedDataset(tmp_path / "p"), j, "piece labels are not -1")


@pytest.mark.parametrize("damage", ["all positive", "empty candidate"])
def test_a_group_the_engine_refuses_is_named_when_read_and_by_verify(tmp_path, packed, damage):
    """engine.group.Group refuses a group without a positive and a negative candidate, or with an
    empty candidate; an index describing one (its counts agreeing) is refused naming the shard and
    the sequence, not by Group naming neither, and verify() finds it."""
    j = 3
    first, groups = described(packed, j)
    prefix, cands, labels = groups[0]
    write(tmp_path / "p", packed)
    if damage == "all positive":
        for i in np.flatnonzero(np.array(labels) == 0):
            poke(tmp_path / "p", 4, first + 1 + int(i), 1)
        groups[0] = (prefix, cands, [1] * len(cands))
    else:  # the first candidate's tokens given to the prefix
        start = int(packed.per_sequence["tokens"][:j].sum())  # pieces lie back to back
        poke(tmp_path / "p", 2, first + 1, start + prefix + cands[0])
        groups[0] = (prefix + cands[0], [0, *cands[1:]], labels)
    recount(tmp_path / "p", packed, j, groups)
    refused_when_read_and_by_verify(IndexedDataset(tmp_path / "p"), j, "a group without")


@pytest.mark.parametrize("text", [b"[]", b"3", b'{"note": "\xff\xfe"}'])
def test_metadata_that_is_no_json_object_is_named(tmp_path, packed, text):
    write(tmp_path / "p", packed)
    (tmp_path / "p.json").write_bytes(text)
    with pytest.raises(DatasetFormatError, match=r"p\.json: not "):
        IndexedDataset(tmp_path)


# ---- offsets that wrap around int64, version-1 sequence lengths ------------------------------------

def overwrite(stem: Path, values: dict) -> None:
    """Writes {array: {element: value}} into the index arrays of the shard at `stem` (poke's order
    and numbering) with no check between two writes: poke opens the shard before each, and a shard
    damaged by the first may be refused."""
    from engine.indexed_dataset import _Shard
    from engine.shard_files import OpenFiles

    layout = _Shard(stem.with_suffix(".idx"), OpenFiles())._layout
    for array, elements in values.items():
        start, end, dtype = layout[array]
        m = np.memmap(stem.with_suffix(".idx"), dtype=dtype, mode="r+", offset=start,
                      shape=((end - start) // dtype.itemsize,))
        for element, value in elements.items():
            m[element] = value
        m.flush()
        del m


def test_offsets_whose_differences_wrap_around_int64_are_refused(tmp_path, packed):
    """Two offsets past 2**62 whose differences wrap around int64 to positive numbers (as do the group
    counts written to agree): offsets checked by their differences passed at open, and a read then
    failed allocating 2**62 elements (naming nothing); a version-1 index passed verify() and read a
    group with an empty candidate, the whole sequence as its prefix."""
    from benchmarks.dataset_open import as_version_1
    from engine.shard_format import COUNTS

    sg = np.concatenate([[0], np.cumsum([len(p) for p in packed.plan])]).astype(np.int64)
    sg[1], sg[2] = 2**62, -2**63 + 2**61
    with np.errstate(over="ignore"):
        wrapped = np.diff(sg)
    assert (wrapped >= 1).all() and int(wrapped.sum()) == len(packed.groups)  # what a check by differences sees
    write(tmp_path / "sg", packed)
    column = COUNTS.index("groups") * len(packed)
    overwrite(tmp_path / "sg", {0: {1: int(sg[1]), 2: int(sg[2])},
                                5: {column + j: int(n) for j, n in enumerate(wrapped)}})
    with pytest.raises(DatasetFormatError, match=r"sg\.idx: sequence offsets do not run from 0"):
        IndexedDataset(tmp_path / "sg")

    first, _ = described(packed, 3)
    write(tmp_path / "pt", packed)
    as_version_1(tmp_path / "pt.idx")
    overwrite(tmp_path / "pt", {2: {first + 1: 2**62, first + 2: -2**63 + 2**61}})
    with pytest.raises(DatasetFormatError, match=r"pt\.idx: piece offsets do not run from 0"):
        IndexedDataset(tmp_path / "pt")


def test_a_version_1_sequence_past_seq_length_is_refused_at_open(tmp_path, packed):
    """A version-2 index is refused at open where a sequence's tokens count passes seq_length; a
    version-1 one (counts computed from its offsets) held such a sequence through open and verify(),
    and the run stopped in collate, naming neither the shard nor the sequence."""
    from benchmarks.dataset_open import as_version_1

    toks = packed.per_sequence["tokens"]
    j = next(j for j in range(len(packed) - 1)
             if toks[j] == SEQ and len(packed.groups[packed.plan[j + 1][0]].prefix) >= 3)
    first_next, _ = described(packed, j + 1)
    write(tmp_path / "p", packed)
    # the boundary between sequences j and j + 1 moved 3 tokens on: j's last candidate takes them
    poke(tmp_path / "p", 2, first_next, int(toks[:j + 1].sum()) + 3)
    as_version_1(tmp_path / "p.idx")
    with pytest.raises(DatasetFormatError, match=rf"p\.idx: packed sequence {j}: its groups hold {SEQ + 3} tokens, "
                                                 rf"more than seq_length {SEQ}"):
        IndexedDataset(tmp_path / "p")


@pytest.mark.parametrize("new_idx_in_place", [False, True])
def test_a_rebuild_putting_its_shard_in_place_while_the_dataset_opens_is_refused(tmp_path, monkeypatch,
                                                                              new_idx_in_place):
    """A --force rebuild removes the old .idx first and puts the new .idx in place last
    (engine.shard_writer): a reader that read the old index and then finds the new .bin (the same
    size: the same records in another order) must not pair the two, whether the new .idx is in
    place yet or not."""
    import pathlib

    groups = random_groups(0, 120)
    write(tmp_path / "ds" / "a", PackedGroups(groups, SEQ))
    write(tmp_path / "new" / "a", PackedGroups(groups[::-1], SEQ))
    real_stat, swapped = pathlib.Path.stat, []

    def rebuild_lands_now(self, **kwargs):  # the reader has the old .idx open; it looks at the .bin next
        if self.name == "a.bin" and not swapped:
            swapped.append(True)
            (tmp_path / "ds" / "a.idx").unlink()
            (tmp_path / "new" / "a.bin").replace(tmp_path / "ds" / "a.bin")
            if new_idx_in_place:
                (tmp_path / "new" / "a.idx").replace(tmp_path / "ds" / "a.idx")
        return real_stat(self, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", rebuild_lands_now)
    why = "replaced or rewritten since" if new_idx_in_place else "removed since the dataset was opened"
    with pytest.raises(DatasetFormatError, match=rf"a\.idx: {why}"):
        IndexedDataset(tmp_path / "ds")
    assert swapped


@pytest.mark.parametrize("vocab, bad, order, named", [
    (300, 300, "<", True), (300, 0xFFFF, "<", True), (70_000, 70_000, "<", True), (70_000, -1, "<", True),
    (300, 300, ">", True), (70_000, 70_000, ">", True), (70_000, -1, ">", True), (70_000, -1, "<", False),
    (70_000, 70_000, "<", False), (300, 0xFFFF, "<", False)])
def test_a_token_id_outside_the_vocabulary_is_named_with_its_file_and_sequence(tmp_path, vocab, bad, order, named):
    """The writer refuses ids outside [0, vocab_size); one read back is a damaged .bin (a flipped
    bit), which reached the model's embedding unnamed: a CUDA device-side assert that kills the run.
    uint16 tokens (vocab 300) and int32 ones (vocab past 65536), in either byte order (the ids are
    checked as stored); a shard whose metadata names no vocabulary: negative ids only."""
    import json

    packed = PackedGroups(random_groups(5, 60, vocab), SEQ)
    write(tmp_path / "p", packed, vocab=vocab)
    dtype = IndexedDataset(tmp_path).shards[0].dtype
    assert dtype.itemsize == (2 if vocab <= 1 << 16 else 4)
    stored = dtype.newbyteorder(order)
    if order == ">":
        b = tmp_path / "p.bin"
        b.write_bytes(np.fromfile(b, dtype).astype(stored).tobytes())
        with open(tmp_path / "p.idx", "r+b") as f:
            f.seek(16)
            f.write(stored.str.encode().ljust(8, b"\0"))
    if not named:
        meta = json.loads((tmp_path / "p.json").read_text())
        del meta["vocab_size"]
        (tmp_path / "p.json").write_text(json.dumps(meta))
    j = 3
    token = sum(len(packed.groups[g]) for p in packed.plan[:j] for g in p) + 2  # the third token of sequence 3
    raw = np.memmap(tmp_path / "p.bin", dtype=stored, mode="r+")
    raw[token] = bad
    raw.flush()
    del raw
    ds = IndexedDataset(tmp_path)
    same_groups(ds.sequences([j - 1, j + 1]), packed.sequences([j - 1, j + 1]))  # the others read as written
    if not named and bad >= 0:  # no vocabulary to hold it against
        tokens = np.concatenate([np.concatenate([g.prefix, *g.candidates]) for g in ds.sequences([j])[0]])
        assert tokens[2] == bad
        return
    within = rf"0\.\.{vocab - 1}" if named else "non-negative ids"
    # its own kind: engine/pretrain.py sends a damaged index, not this, to polar data stats and --check-config
    with pytest.raises(DatasetTokenError, match=rf"p\.bin: packed sequence {j}: token id {bad} at token 2 of "
                                                rf"its \d+, outside {within}"):
        ds.sequences([j])
