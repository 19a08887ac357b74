"""Shared-prefix packing: whole groups of token ids into fixed-length sequences, and their layout.

A group is one prefix shared by K >= 2 candidates; its reward for candidate k is read at the last
token of that candidate. The prefix is stored once and every candidate attends to it, so a group of
prefix length P and candidate lengths c_1..c_K costs P + sum(c_k) tokens instead of K*P + sum(c_k).
Groups are packed whole (never split) into sequences of `seq_length` tokens by the C++ packer
(engine._C), and `collate` lays a micro-batch out as

    tokens   [b, L]     the group's prefix, then candidate 1, ..., candidate K; pad_id after the last group
    layout   [b, 3, L]  row 0 position: prefix 0..P-1, candidate k P..P+c_k-1 (as if prefix + candidate
                        stood alone); row 1 segment: group slot in the sequence, -1 on padding;
                        row 2 candidate: 0 on the prefix, k on candidate k (1-based), 0 on padding

from which attention is: query i sees key j iff segment[i] == segment[j] != -1, j <= i and
candidate[j] in {0, candidate[i]} (`dense_mask` is that rule written out densely, the reference for
faster kernels). This module knows only token ids; building groups from text is the recipe's job.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from engine import pack_plan
from engine.group import Group

POSITION, SEGMENT, CANDIDATE = 0, 1, 2  # rows of PackedBatch.layout
plan_sequences = pack_plan.plan_sequences  # the packer's plan lives without torch (engine.pack_plan)


@dataclass
class PackedBatch:
    """One micro-batch of packed sequences (CPU tensors until `.to(device)`)."""

    tokens: torch.Tensor  # int64 [b, L]; pad_id where nothing
    layout: torch.Tensor  # int32 [b, 3, L]; rows POSITION, SEGMENT, CANDIDATE (module docstring)
    reward_index: torch.Tensor  # int64 [n_cand]; flat index bi*L + t of each candidate's last token
    cand_group: torch.Tensor  # int64 [n_cand]; batch-level group 0..G-1 of each candidate
    labels: torch.Tensor  # int64 [n_cand]
    pair_pos: torch.Tensor  # int64 [n_pairs]; candidate indices, every (positive, negative) pair in a group
    pair_neg: torch.Tensor  # int64 [n_pairs]
    num_groups: int
    num_real_tokens: int

    def _map_tensors(self, fn) -> "PackedBatch":
        return dataclasses.replace(
            self,
            **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
               if isinstance(getattr(self, f.name), torch.Tensor)},
        )

    def to(self, device, non_blocking: bool = True) -> "PackedBatch":
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        # torch's DataLoader(pin_memory=True) calls this; a non-blocking copy is only truly
        # asynchronous from pinned memory (torch's caching host allocator reuses a block only after
        # the copies reading it ran). An empty tensor (a scoring batch's pair indices) has no bytes
        # to copy and is kept as it is.
        return self._map_tensors(lambda t: t.pin_memory() if t.numel() else t)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    np.cumsum(x[:-1], out=out[1:])
    return out


def _pairs(labels: np.ndarray, cand_group: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (positive, negative) candidate pair of each group, ordered by group, then positive,
    then negative (candidates numbered in group order): for each positive, its group's negatives."""
    pos = np.flatnonzero(labels == 1)
    neg = np.flatnonzero(labels == 0)
    neg_count = np.bincount(cand_group[neg], minlength=num_groups)
    reps = neg_count[cand_group[pos]]  # pairs of each positive
    pair_pos = np.repeat(pos, reps)
    first_neg = np.repeat(_exclusive_cumsum(neg_count)[cand_group[pos]], reps)  # into `neg`
    within = np.arange(pair_pos.size, dtype=np.int64) - np.repeat(_exclusive_cumsum(reps), reps)
    return pair_pos.astype(np.int64, copy=False), neg[first_neg + within].astype(np.int64, copy=False)


def collate(sequences: list[list[Group]], seq_length: int, pad_id: int) -> PackedBatch:
    """Lay out b sequences of whole groups as one PackedBatch of shape [b, seq_length].

    Candidates are numbered in batch group order (sequence 0's groups first), then candidate order;
    reward_index, cand_group, labels and the pair indices all use that numbering.
    """
    b, L = len(sequences), int(seq_length)
    # The per-group loop only gathers "pieces" (a prefix or one candidate) and their group's
    # attributes; every per-token, per-candidate and per-pair array is then made from them with
    # repeat/cumsum in one pass.
    pieces: list[np.ndarray] = []
    group_pieces, group_prefix, group_slot, group_row = [], [], [], []
    labels: list[np.ndarray] = []
    for row, groups in enumerate(sequences):
        for slot, g in enumerate(groups):
            pieces.append(g.prefix)
            pieces.extend(g.candidates)
            group_pieces.append(len(g.candidates) + 1)
            group_prefix.append(len(g.prefix))
            group_slot.append(slot)
            group_row.append(row)
            labels.append(g.labels)

    num_groups = len(group_pieces)
    group_pieces = np.asarray(group_pieces, dtype=np.int64)
    group_row = np.asarray(group_row, dtype=np.int64)
    piece_len = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    piece_row = np.repeat(group_row, group_pieces)
    row_tokens = np.zeros(b, dtype=np.int64)
    np.add.at(row_tokens, piece_row, piece_len)
    over = np.flatnonzero(row_tokens > L)
    if over.size:
        row = int(over[0])
        raise ValueError(
            f"sequence {row} of the batch holds {row_tokens[row]} tokens in {len(sequences[row])} groups, "
            f"more than seq_length={L}; plan it with plan_sequences(..., {L})"
        )
    # k-th piece of its group: 0 = prefix, k = candidate k.
    piece_cand = np.arange(len(pieces), dtype=np.int64) - np.repeat(_exclusive_cumsum(group_pieces), group_pieces)
    piece_base = np.where(piece_cand == 0, 0, np.repeat(np.asarray(group_prefix, dtype=np.int64), group_pieces))
    piece_slot = np.repeat(np.asarray(group_slot, dtype=np.int64), group_pieces)
    piece_start = _exclusive_cumsum(piece_len)  # in the concatenation of all real tokens
    # Shifts a piece from the concatenation of all real tokens to its place in the flat [b*L] batch.
    piece_shift = piece_row * L - _exclusive_cumsum(row_tokens)[piece_row]

    n_tokens = int(piece_len.sum())
    token_in_all = np.arange(n_tokens, dtype=np.int64)
    dest = token_in_all + np.repeat(piece_shift, piece_len)

    tokens = np.full(b * L, pad_id, dtype=np.int64)
    tokens[dest] = _cat(pieces, np.int64)
    layout = np.zeros((3, b * L), dtype=np.int32)
    layout[SEGMENT] = -1
    layout[POSITION, dest] = token_in_all - np.repeat(piece_start - piece_base, piece_len)
    layout[SEGMENT, dest] = np.repeat(piece_slot, piece_len)
    layout[CANDIDATE, dest] = np.repeat(piece_cand, piece_len)

    is_cand = piece_cand > 0
    reward_index = (piece_start + piece_len - 1 + piece_shift)[is_cand]
    cand_group = np.repeat(np.arange(num_groups, dtype=np.int64), group_pieces - 1)
    cand_labels = _cat(labels, np.int64)
    pair_pos, pair_neg = _pairs(cand_labels, cand_group, num_groups)

    return PackedBatch(
        tokens=torch.from_numpy(tokens.reshape(b, L)),
        layout=torch.from_numpy(np.ascontiguousarray(layout.reshape(3, b, L).transpose(1, 0, 2))),
        reward_index=torch.from_numpy(reward_index),
        cand_group=torch.from_numpy(cand_group),
        labels=torch.from_numpy(cand_labels),
        pair_pos=torch.from_numpy(pair_pos),
        pair_neg=torch.from_numpy(pair_neg),
        num_groups=num_groups,
        num_real_tokens=n_tokens,
    )


class LayoutCache:
    """Values derived from a layout tensor (masks, RoPE angles, kernel schedules), built once per
    layout: every layer of one forward sees the same layout object. The `layouts` most recent
    layout tensors keep their values (with pipelining, several micro-batches are in flight at once).
    Entries hold the layout itself, so its id is never reused while they live; the version counter
    catches in-place edits."""

    def __init__(self, layouts: int = 1):
        self.layouts = layouts
        self.entries: list = []  # (layout, version, {key: value}), most recent first

    def get(self, layout: torch.Tensor, key, build):
        values = None
        for entry in self.entries:
            if entry[0] is layout and entry[1] == layout._version:
                values = entry[2]
                break
        if values is None:
            values = {}
            self.entries = [(layout, layout._version, values)] + self.entries[: self.layouts - 1]
        if key not in values:
            values[key] = build()
        return values[key]


def next_token_mask(layout: torch.Tensor) -> torch.Tensor:
    """layout int [b, 3, L] -> bool [b, L-1]: position t predicts token t+1, i.e. t+1 continues the
    same piece (the prefix, or the same candidate) of the same group. The token after a prefix is
    ambiguous in the shared-prefix layout (one per candidate), so it is never a target."""
    seg, cand = layout[:, SEGMENT], layout[:, CANDIDATE]
    return (seg[:, 1:] == seg[:, :-1]) & (cand[:, 1:] == cand[:, :-1]) & (seg[:, :-1] >= 0)


def dense_mask(layout: torch.Tensor) -> torch.Tensor:
    """layout int [b, 3, L] -> bool [b, L, L], True where query (row) i may attend to key (column) j.

    i sees j iff same segment (not padding), j <= i, and j is on the prefix or on i's own candidate.
    A padding query sees only itself, so no softmax row is entirely masked (which would give NaN).
    O(L^2) memory: a reference and a small-L fallback, not a training path for long sequences.
    """
    seg = layout[:, SEGMENT]
    cand = layout[:, CANDIDATE]
    L = layout.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=layout.device).tril_()
    same_seg = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != -1)
    visible_cand = (cand[:, None, :] == 0) | (cand[:, None, :] == cand[:, :, None])
    mask = same_seg & causal & visible_cand
    pad_self = torch.eye(L, dtype=torch.bool, device=layout.device) & (seg == -1)[:, :, None]
    return mask | pad_self
