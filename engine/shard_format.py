"""The on-disk format of a packed dataset (engine/shard_writer.py writes it, engine/indexed_dataset.py
reads it), and the checks both sides make of an index.

A dataset is a directory of shards, read as their concatenation in file-name order. A shard is

    NAME.bin    the token ids of every piece (a group's prefix, then its candidates), back to back,
                in the dtype the index names (uint16 when the vocabulary fits, else int32)
    NAME.idx    header + index arrays (below); written last, so its presence marks a complete shard
    NAME.json   the builder's metadata (tokenizer, special ids, counts, sources ...), free-form
                except for the keys ShardWriter writes (seq_length, vocab_size, pad_id, token_dtype,
                shard) and `build` (engine/build_sets.py); the reader checks seq_length, vocab_size,
                pad_id, bos_id and build

    .idx = magic b"PLRIDX\\0\\0", uint32 version, uint32 K, char[8] token dtype (numpy str, padded),
           uint64 seq_length, S sequences, G groups, P pieces, T tokens, then (little-endian):
           int64 seq_groups[S+1]    groups of sequence s: seq_groups[s] .. seq_groups[s+1]
           int64 group_pieces[G+1]  pieces of group g; the first is its prefix, the rest candidates
                                    (non-empty, a positive and a negative among them)
           int64 piece_tokens[P+1]  tokens of piece p in .bin: piece_tokens[p] .. piece_tokens[p+1]
           int64 group_source[G]    the builder's id of the record a group came from (-1 = none)
           int8  piece_label[P]     -1 on a prefix, else the candidate's label (1 positive, 0 negative)
           (version 2: zero padding to a multiple of 8 bytes, then)
           int64 counts[K][S]       per sequence, what training needs before it reads a sequence
                                    (COUNTS: tokens, groups, pairs, ...; engine.group.per_group_counts
                                    summed over the sequence's groups); K = 0 in version 1

Concatenating datasets is copying their shard files into one directory under names that sort in
the wanted order (e.g. `a-part-00000-of-00002.*`, `b-part-...`); all shards must agree on
seq_length, vocab_size, pad_id and bos_id (engine/build_sets.py's AGREED), and where both record them on
the tokenizer's content digest and reward token ids (not on the tokenizer's name, a path on the machine
that built the shard). This format knows token ids and groups only, no text format.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

from engine.group import per_group_counts

MAGIC = b"PLRIDX\0\0"
VERSION = 2  # the version ShardWriter writes; the reader also reads 1
# The per-sequence count columns of a version-2 index, in file order: engine.group.per_group_counts'
# keys (another set or order is another version).
COUNTS = ("tokens", "groups", "pairs", "positives", "lm_targets", "attention_pairs")
HEADER = struct.Struct("<8sII8sQQQQQ")


class DatasetFormatError(ValueError):
    """A shard that cannot be read as written by ShardWriter; the message names the file."""


class DatasetTokenError(DatasetFormatError):
    """A token id outside the shard's vocabulary, found as its sequence's tokens are read: the whole-index
    check (IndexedDataset.verify: polar data stats, --check-config) reads no token, so it never finds one."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)



def groups_problem(n_cand: np.ndarray, n_pos: np.ndarray, cand_lengths: np.ndarray) -> str | None:
    """What engine.group.Group would refuse of groups of n_cand candidates, n_pos of them positive
    (`cand_lengths`: their candidates' lengths), or None. Read, such a group would stop a run with
    Group's error, which names neither the shard nor the sequence."""
    if (n_pos < 1).any() or (n_pos >= n_cand).any() or (cand_lengths < 1).any():
        return "a group without a positive and a negative candidate, or with an empty candidate"
    return None


class ShardIndex(NamedTuple):
    """A shard's index arrays (see the module docstring): views of its mapped .idx, or arrays like them
    (ShardWriter's before it writes them; a run of sequences _Shard.verify checks, offsets from 0)."""
    seq_groups: np.ndarray
    group_pieces: np.ndarray
    piece_tokens: np.ndarray
    group_source: np.ndarray
    piece_label: np.ndarray
    counts: np.ndarray | None  # [len(COUNTS), S] (version 2), None (version 1)


def check_offsets(ix: ShardIndex, tokens: int) -> str | None:
    """What is wrong with the offsets and labels of `ix` (whose last piece ends at `tokens`), or None.
    Sequences hold >= 1 group, and groups a prefix (which may be empty) and candidates as
    groups_problem asks."""
    for name, a, last, empty in (("sequence", ix.seq_groups, len(ix.group_pieces) - 1, False),
                                 ("group", ix.group_pieces, len(ix.piece_label), False),
                                 ("piece", ix.piece_tokens, tokens, True)):
        # compared, not subtracted: differences of offsets past 2**62 wrap around int64 to positive ones
        if a.size == 0 or a[0] != 0 or a[-1] != last or ((a[1:] < a[:-1]) if empty else (a[1:] <= a[:-1])).any():
            return f"{name} offsets do not run from 0 to {last}"
    is_prefix = np.zeros(len(ix.piece_label), dtype=bool)
    is_prefix[ix.group_pieces[:-1]] = True
    if (is_prefix != (ix.piece_label == -1)).any() or not np.isin(ix.piece_label[~is_prefix], (0, 1)).all():
        return "piece labels are not -1 on prefixes and 0/1 on candidates"
    return groups_problem(np.diff(ix.group_pieces) - 1,
                           segment_sums((ix.piece_label == 1).astype(np.int64), ix.group_pieces),
                           np.diff(ix.piece_tokens)[~is_prefix])


def segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of values[offsets[i]:offsets[i+1]] for each i, in one pass."""
    cs = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=cs[1:])
    return cs[offsets[1:]] - cs[offsets[:-1]]


def sequence_counts(ix: ShardIndex) -> dict:
    """engine.group.per_group_counts of the index's groups, summed per sequence (int64 arrays)."""
    piece_len = np.diff(ix.piece_tokens)
    is_prefix = ix.piece_label < 0
    lengths = segment_sums(piece_len, ix.group_pieces)
    n_cand = np.diff(ix.group_pieces) - 1
    n_pos = segment_sums((ix.piece_label == 1).astype(np.int64), ix.group_pieces)
    cand_sq = segment_sums(np.where(is_prefix, 0, piece_len * piece_len), ix.group_pieces)
    per_group = per_group_counts(lengths, n_pos, n_cand, piece_len[is_prefix], cand_sq)
    return {k: segment_sums(per_group[k], ix.seq_groups) for k in COUNTS}
