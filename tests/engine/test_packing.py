"""engine.packing: collate over the packer's plan and the reference mask, checked token by token."""
import numpy as np
import pytest
import torch

from engine.packing import (
    CANDIDATE, POSITION, SEGMENT, Group, LayoutCache, PackedBatch, collate, dense_mask, plan_sequences,
)

P = 0  # pad id; no real token below uses it


def group(prefix, candidates, labels):
    return Group(np.array(prefix), [np.array(c) for c in candidates], np.array(labels))


def hand_built():
    g0 = group([11, 12, 13], [[21, 22], [31], [41, 42, 43]], [1, 0, 0])  # 9 tokens, K = 3
    g1 = group([51], [[61, 62], [71]], [0, 1])  # 4 tokens
    g2 = group([81, 82], [[91], [92, 93], [94], [95, 96]], [1, 0, 1, 0])  # 8 tokens, two positives
    return g0, g1, g2


def test_collate_by_hand():
    g0, g1, g2 = hand_built()
    b = collate([[g0, g1], [g2]], seq_length=16, pad_id=P)
    assert b.tokens.dtype == torch.int64 and b.layout.dtype == torch.int32
    assert b.tokens.tolist() == [
        [11, 12, 13, 21, 22, 31, 41, 42, 43, 51, 61, 62, 71, P, P, P],
        [81, 82, 91, 92, 93, 94, 95, 96, P, P, P, P, P, P, P, P],
    ]
    assert b.layout[:, POSITION].tolist() == [
        [0, 1, 2, 3, 4, 3, 3, 4, 5, 0, 1, 2, 1, 0, 0, 0],
        [0, 1, 2, 2, 3, 2, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert b.layout[:, SEGMENT].tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1],
        [0, 0, 0, 0, 0, 0, 0, 0] + [-1] * 8,
    ]
    assert b.layout[:, CANDIDATE].tolist() == [
        [0, 0, 0, 1, 1, 2, 3, 3, 3, 0, 1, 1, 2, 0, 0, 0],
        [0, 0, 1, 2, 2, 3, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert b.reward_index.tolist() == [4, 5, 8, 11, 12, 16 + 2, 16 + 4, 16 + 5, 16 + 7]
    assert b.tokens.flatten()[b.reward_index].tolist() == [22, 31, 43, 62, 71, 91, 93, 94, 96]
    assert b.cand_group.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert b.labels.tolist() == [1, 0, 0, 0, 1, 1, 0, 1, 0]
    assert list(zip(b.pair_pos.tolist(), b.pair_neg.tolist())) == [(0, 1), (0, 2), (4, 3), (5, 6), (5, 8), (7, 6), (7, 8)]
    assert b.num_groups == 3 and b.num_real_tokens == 21


def test_group_that_fills_a_sequence_exactly():
    g0, g1, _ = hand_built()
    b = collate([[g0, g1]], seq_length=13, pad_id=P)
    assert (b.layout[:, SEGMENT] >= 0).all() and b.num_real_tokens == 13
    assert b.reward_index.tolist()[-1] == 12
    with pytest.raises(ValueError, match=r"sequence 0 .*13 tokens.*seq_length=12"):
        collate([[g0, g1]], seq_length=12, pad_id=P)
    with pytest.raises(ValueError, match=r"sequence 1 "):
        collate([[g1], [g0, g1]], seq_length=12, pad_id=P)
    plan = plan_sequences(np.array([len(g0), len(g1), 7, 6]), 13)
    assert [p.tolist() for p in plan] == [[0, 1], [2, 3]]


def ref_collate(sequences, L, pad_id):
    """Token-by-token construction, the obvious way."""
    tokens, pos, seg, cand = ([[v] * L for _ in sequences] for v in (pad_id, 0, -1, 0))
    reward_index, cand_group, labels, pairs = [], [], [], []
    gi = 0
    for r, groups in enumerate(sequences):
        t = 0
        for s, g in enumerate(groups):
            for p, tok in enumerate(g.prefix):
                tokens[r][t], pos[r][t], seg[r][t], cand[r][t] = tok, p, s, 0
                t += 1
            first = len(labels)
            for k, c in enumerate(g.candidates):
                for p, tok in enumerate(c):
                    tokens[r][t], pos[r][t], seg[r][t], cand[r][t] = tok, len(g.prefix) + p, s, k + 1
                    t += 1
                reward_index.append(r * L + t - 1)
                cand_group.append(gi)
                labels.append(int(g.labels[k]))
            pairs += [(first + i, first + j) for i in range(len(g.labels)) for j in range(len(g.labels))
                      if g.labels[i] == 1 and g.labels[j] == 0]
            gi += 1
    return tokens, [[a, b, c] for a, b, c in zip(pos, seg, cand)], reward_index, cand_group, labels, pairs


def random_groups(rng, n):
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 5))
        labels = np.zeros(k, dtype=np.int8)
        labels[rng.choice(k, size=int(rng.integers(1, k)), replace=False)] = 1
        out.append(Group(rng.integers(1, 1000, size=int(rng.integers(0, 6))),
                         [rng.integers(1, 1000, size=int(rng.integers(1, 5))) for _ in range(k)], labels))
    return out


@pytest.mark.parametrize("method", ["best_fit", "ordered"])
def test_plan_and_collate_match_reference(method):
    rng = np.random.default_rng(0)
    groups = random_groups(rng, 60)
    L = 40
    lengths = np.array([len(g) for g in groups])
    plan = plan_sequences(lengths, L, method=method)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(len(groups)))
    assert all(lengths[p].sum() <= L for p in plan)
    if method == "ordered":
        assert flat.tolist() == list(range(len(groups)))
    sequences = [[groups[i] for i in p] for p in plan]
    b = collate(sequences, L, pad_id=-7)
    tokens, layout, reward_index, cand_group, labels, pairs = ref_collate(sequences, L, -7)
    assert b.tokens.tolist() == tokens
    assert b.layout.tolist() == layout
    assert b.reward_index.tolist() == reward_index
    assert b.cand_group.tolist() == cand_group
    assert b.labels.tolist() == labels
    assert list(zip(b.pair_pos.tolist(), b.pair_neg.tolist())) == pairs
    assert b.num_real_tokens == lengths.sum() and b.num_groups == len(groups)


def brute_force_mask(layout):
    bsz, _, L = layout.shape
    out = torch.zeros(bsz, L, L, dtype=torch.bool)
    for r in range(bsz):
        _, seg, cand = layout[r].tolist()
        for i in range(L):
            for j in range(L):
                if seg[i] == -1:
                    out[r, i, j] = i == j
                else:
                    out[r, i, j] = seg[j] == seg[i] and j <= i and cand[j] in (0, cand[i])
    return out


def test_dense_mask_matches_brute_force():
    g0, g1, g2 = hand_built()
    b = collate([[g0, g1], [g2], []], seq_length=16, pad_id=P)
    mask = dense_mask(b.layout)
    assert mask.shape == (3, 16, 16) and mask.dtype == torch.bool
    assert torch.equal(mask, brute_force_mask(b.layout))
    assert torch.equal(mask[2], torch.eye(16, dtype=torch.bool))  # an all-padding row
    # Spot checks of the rule itself, not of its transcription: candidate 2 of group 0 (token 31 at t=5)
    # sees the prefix and itself but not candidate 1; group 1's prefix (t=9) sees nothing of group 0.
    assert mask[0, 5].nonzero().flatten().tolist() == [0, 1, 2, 5]
    assert mask[0, 9].nonzero().flatten().tolist() == [9]


def test_each_candidate_sees_exactly_prefix_plus_itself():
    # The point of the layout: a candidate token sees the keys it would see in prefix + candidate
    # alone, so the visible positions are exactly 0..its own position.
    rng = np.random.default_rng(1)
    groups = random_groups(rng, 12)
    plan = plan_sequences(np.array([len(g) for g in groups]), 48)
    b = collate([[groups[i] for i in p] for p in plan], 48, pad_id=P)
    mask = dense_mask(b.layout)
    pos, seg = b.layout[:, POSITION], b.layout[:, SEGMENT]
    for r in range(mask.shape[0]):
        for i in range(48):
            if seg[r, i] >= 0:
                seen = sorted(pos[r, mask[r, i]].tolist())
                assert seen == list(range(int(pos[r, i]) + 1)), (r, i)


def test_to_moves_every_tensor():
    g0, g1, _ = hand_built()
    b = collate([[g0, g1]], seq_length=16, pad_id=P)
    moved = b.to("cpu")
    assert isinstance(moved, PackedBatch) and moved.num_groups == b.num_groups
    for name in ("tokens", "layout", "reward_index", "cand_group", "labels", "pair_pos", "pair_neg"):
        assert torch.equal(getattr(moved, name), getattr(b, name))


def test_layout_cache_builds_once_per_layout_and_keeps_the_most_recent():
    builds = []
    cache = LayoutCache(layouts=2)

    def get(layout, key):
        return cache.get(layout, key, lambda: builds.append((id(layout), key)) or len(builds))

    a, b, c = (torch.zeros(1, 3, 4, dtype=torch.int32) for _ in range(3))
    assert get(a, "mask") == get(a, "mask") == 1 and get(a, "rope") == 2  # once per (layout, key)
    get(b, "mask")
    assert get(a, "mask") == 1  # two layouts are kept
    get(c, "mask")  # a is now the oldest of three: dropped
    assert get(a, "mask") == 5 and len(builds) == 5
    a.add_(1)  # an in-place edit is a new layout
    assert get(a, "mask") == 6
