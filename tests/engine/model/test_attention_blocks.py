"""The `blocks` attention backend (one SDPA per group) against the float64 dense-mask reference:
outputs and all three input gradients, on ragged packs with padding, GQA, empty prefixes, a row
that is all padding and a row filled exactly."""
import numpy as np
import pytest
import torch

from engine.model import shared_prefix_attention as spa
from engine.packing import SEGMENT, collate
from tests.engine.kernels.attention_cases import NAMES, random_group, random_layout, reference, rel_err, run


@pytest.fixture(autouse=True)
def always_blocks(monkeypatch):
    """The cases are short packs, which the backend would hand to the dense path."""
    monkeypatch.setattr(spa, "DENSE_BELOW", 0)


def _inputs(seed, layout, hq, hkv, d):
    gen = torch.Generator().manual_seed(seed)
    s, b = layout.shape[-1], layout.shape[0]
    q, k, v = (torch.randn(s, b, h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(s, b, hq * d, generator=gen, dtype=torch.float64)


# (seed, b, groups per row, K range, hq, hkv, d)
CASES = [(0, 2, 3, (2, 5), 2, 2, 16), (1, 3, 2, (2, 4), 4, 1, 32), (2, 1, 1, (8, 17), 4, 2, 8),
         (3, 2, 4, (2, 3), 6, 3, 16)]


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c[0]}-hq{c[4]}-hkv{c[5]}" for c in CASES])
def test_blocks_match_float64_reference(case):
    seed, b, n_groups, k_range, hq, hkv, d = case
    layout = random_layout(seed, b, n_groups, k_range, p_max=20, c_max=8)
    assert (layout[:, SEGMENT] == -1).any()  # padding is part of the case
    q, k, v, grad = _inputs(100 + seed, layout, hq, hkv, d)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    got = run(spa.blocked_shared_prefix_attention, q, k, v, grad, layout, torch.float32)
    for name, g, r in zip(NAMES, got, ref):
        assert g.shape == r.shape and g.dtype == torch.float32, name
        assert rel_err(g, r) < 2e-6, (name, rel_err(g, r))


def test_exact_fill_padding_only_row_and_empty_prefix():
    rng = np.random.default_rng(9)
    rows = [[random_group(rng, 5, [3, 4]), random_group(rng, 0, [2, 6, 1])], [], [random_group(rng, 1, [1, 1])]]
    layout = collate(rows, 21, pad_id=0).layout  # row 0 fills all 21 tokens, row 1 is all padding
    q, k, v, grad = _inputs(7, layout, 4, 2, 16)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    got = run(spa.blocked_shared_prefix_attention, q, k, v, grad, layout, torch.float64)
    for name, g, r in zip(NAMES, got, ref):
        assert rel_err(g, r) < 1e-12, name


def test_blocks_follow_segments_and_are_built_once_per_layout(monkeypatch):
    layout = random_layout(4, 2, 3, (2, 4), p_max=10, c_max=6)
    plan = spa.group_blocks(layout)
    for r, row in enumerate(plan):
        assert sum(n for n, _ in row) == layout.shape[-1]
        seg, start = layout[r, SEGMENT], 0
        for n, mask in row:
            assert (seg[start:start + n] == seg[start]).all()  # one segment a block
            assert (mask is None) == bool(seg[start] < 0)  # no mask only on padding
            start += n
        assert len(row) == len(torch.unique_consecutive(seg))
    calls = []
    monkeypatch.setattr(spa, "group_blocks", lambda lay: calls.append(1) or plan)
    q, k, v, grad = _inputs(3, layout, 2, 1, 8)
    for _ in range(3):  # three layers of one forward
        spa.blocked_shared_prefix_attention(q.float(), k.float(), v.float(), layout, 0.3)
    assert len(calls) == 1


def test_short_packs_take_the_dense_path(monkeypatch):
    monkeypatch.setattr(spa, "DENSE_BELOW", 10_000)
    monkeypatch.setattr(spa, "group_blocks", lambda lay: pytest.fail("a short pack was split into groups"))
    layout = random_layout(5, 2, 2, (2, 3), p_max=8, c_max=4)
    q, k, v, grad = _inputs(5, layout, 2, 1, 8)
    ref = run(reference, q, k, v, grad, layout, torch.float64)
    got = run(spa.blocked_shared_prefix_attention, q, k, v, grad, layout, torch.float64)
    for name, g, r in zip(NAMES, got, ref):
        assert rel_err(g, r) < 1e-12, name
