"""The attention kernels' tile schedule and FLOP count (engine/kernels/attention_schedule.py) against
the dense mask: every tile a mask needs is visited, tiles inside one piece are visited exactly, and
far fewer tiles than the causal triangle are touched. Pure torch: no kernel runs (the kernel module is
imported for the tile sizes it launches with on a GPU)."""
import pytest
import torch

from engine.kernels.attention_schedule import attention_flops, tile_schedule, token_metadata, visible_pairs
from engine.kernels.shared_prefix_attention import _blocks
from engine.packing import dense_mask
from tests.engine.kernels.attention_cases import random_layout


def _tile_any(mask, bm, bn):
    b, L, _ = mask.shape
    nq, nk = -(-L // bm), -(-L // bn)
    padded = torch.zeros(b, nq * bm, nk * bn, dtype=torch.bool)
    padded[:, :L, :L] = mask
    return padded.view(b, nq, bm, nk, bn).any(4).any(2)  # [b, nq, nk]


def _pure_tiles(layout, block):
    """Tiles whose tokens are all in one piece, or all padding: these must be visited exactly."""
    meta = token_metadata(layout)
    L = layout.shape[-1]
    n = -(-L // block)
    pid = torch.full((layout.shape[0], n * block), -1, dtype=torch.int64)
    pid[:, :L] = meta["pid"]
    pad = torch.ones((layout.shape[0], n * block), dtype=torch.bool)
    pad[:, :L] = meta["pad"]
    tiles, pads = pid.view(-1, n, block), pad.view(-1, n, block)
    valid = torch.zeros_like(pads)
    valid.view(-1, n * block)[:, :L] = True
    first = tiles[:, :, :1]
    one_piece = ((tiles == first) | ~valid.view_as(tiles)).all(2)
    return one_piece | (pads | ~valid.view_as(pads)).all(2)


GPU = _blocks(128, torch.device("cuda"))  # host code: the tile sizes the kernels launch with on a GPU


# (block_m, block_n, piece length scale): the interpreter's sizes, and the GPU's forward and backward
# tiles over pieces as many times longer, so that tiles also lie inside one piece there
@pytest.mark.parametrize("bm,bn,f", [(16, 16, 1), (32, 16, 1), (16, 64, 1), (8, 8, 1),
                                     (GPU.fwd_m, GPU.fwd_n, 8), (GPU.bwd_m, GPU.bwd_n, 4)])
def test_tile_schedule_covers_the_mask_and_skips_the_rest(bm, bn, f):
    for seed in range(4):
        layout = random_layout(200 + seed, 2, 3, (2, 9), p_max=40 * f, c_max=30 * f, pad_max=40 * f)
        need = _tile_any(dense_mask(layout), bm, bn)
        q_visits, k_visits = tile_schedule(layout, bm, bn)
        assert q_visits.shape == need.shape and k_visits.shape == need.transpose(1, 2).shape
        assert not (need & ~q_visits).any(), "a query tile misses a key tile it needs"
        assert not (need.transpose(1, 2) & ~k_visits).any(), "a key tile misses a query tile that needs it"
        pure_q, pure_k = _pure_tiles(layout, bm), _pure_tiles(layout, bn)
        assert pure_q.any() or pure_k.any()  # the exactness checks below are not vacuous
        assert torch.equal(q_visits[pure_q], need[pure_q]), "a query tile inside one piece visits a masked tile"
        assert torch.equal(k_visits[pure_k], need.transpose(1, 2)[pure_k])
        # the skipping is real: far fewer tiles than the causal triangle
        causal = _tile_any(torch.ones(1, layout.shape[-1], layout.shape[-1], dtype=torch.bool).tril(), bm, bn)
        assert q_visits.sum(dim=(1, 2)).max() < causal.sum()


def test_visible_pairs_and_flops():
    for seed in range(3):
        layout = random_layout(300 + seed, 3, 3, (2, 6), pad_max=12)
        pad = (layout[:, 1] < 0).sum(1)
        expected = dense_mask(layout).sum((1, 2)) - pad
        assert torch.equal(visible_pairs(layout), expected)
        total = int(expected.sum())
        assert attention_flops(layout, 8, 128, backward=False) == 4 * 128 * total * 8
        assert attention_flops(layout, 8, 128) == int(3.5 * 4 * 128 * total * 8)
