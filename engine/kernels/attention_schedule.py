"""Where the shared-prefix attention kernels look: per-token pieces and the tiles each program visits,
computed on the device from the packed layout with vectorised torch ops (no host sync), plus the
mask's useful FLOPs. Pure torch: the schedule is tested against the dense mask without triton.

A piece is a group's prefix, one candidate, or one padding token (contiguous runs, as
`engine.packing.collate` lays them out). A forward (or dQ) program of BLOCK_M queries visits two key
ranges, [min group start, max prefix end) over its candidate queries and [min piece start, tile end),
merged when they touch; a dK/dV program of BLOCK_N keys visits the query tiles
[tile start, max over its keys of (prefix key ? group end : piece end)).
"""
from __future__ import annotations

import torch


def _starts_to_spans(is_start: torch.Tensor):
    """Per token, the start and end (exclusive) of the run it belongs to, given run-start flags [b, L]."""
    b, L = is_start.shape
    idx = torch.arange(L, device=is_start.device, dtype=torch.int32).expand(b, L)
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    # the next run's start after token i, found as a suffix minimum
    nxt = torch.full_like(idx, L)
    nxt[:, :-1] = torch.where(is_start[:, 1:], idx[:, 1:], torch.full_like(idx[:, 1:], L))
    end = nxt.flip(1).cummin(dim=1).values.flip(1)
    return start, end


def token_metadata(layout: torch.Tensor) -> dict:
    """Per-token piece ids and spans [b, L] (int32) from the layout, vectorised."""
    seg = layout[:, 1].to(torch.int32)
    cand = layout[:, 2].to(torch.int32)
    b, L = seg.shape
    pad = seg < 0
    changes = torch.ones_like(pad)
    changes[:, 1:] = (seg[:, 1:] != seg[:, :-1]) | (cand[:, 1:] != cand[:, :-1])
    piece_start_flag = changes | pad  # every padding token is a piece of its own
    group_start_flag = torch.ones_like(pad)
    group_start_flag[:, 1:] = seg[:, 1:] != seg[:, :-1]
    group_start_flag |= pad
    piece_start, piece_end = _starts_to_spans(piece_start_flag)
    group_start, group_end = _starts_to_spans(group_start_flag)
    pid = piece_start_flag.to(torch.int32).cumsum(1, dtype=torch.int32) - 1
    # the group's first piece is its prefix unless the prefix is empty (then the group starts with candidate 1)
    first_is_prefix = cand.gather(1, group_start.long()) == 0
    prefix_end = torch.where(first_is_prefix, piece_end.gather(1, group_start.long()), group_start)
    is_cand = (cand != 0) & ~pad
    ppid = torch.where(is_cand & first_is_prefix, pid.gather(1, group_start.long()), pid)
    is_prefix = (cand == 0) & ~pad
    return dict(pid=pid, ppid=ppid, piece_start=piece_start, piece_end=piece_end, group_start=group_start,
                group_end=group_end, prefix_end=prefix_end, is_cand=is_cand, is_prefix=is_prefix, pad=pad)


def _tile_reduce(x: torch.Tensor, block: int, fill: int, op: str) -> torch.Tensor:
    b, L = x.shape
    n = -(-L // block)
    padded = torch.full((b, n * block), fill, device=x.device, dtype=x.dtype)
    padded[:, :L] = x
    tiles = padded.view(b, n, block)
    return tiles.amin(2) if op == "min" else tiles.amax(2)


def query_schedule(meta: dict, L: int, block_m: int, block_n: int) -> torch.Tensor:
    """[b, n_qtiles, 4] int32: key-tile ranges [a0, a1) then [b0, b1) each query tile visits."""
    is_cand = meta["is_cand"]
    lo1 = _tile_reduce(torch.where(is_cand, meta["group_start"], L), block_m, L, "min")
    hi1 = _tile_reduce(torch.where(is_cand, meta["prefix_end"], 0), block_m, 0, "max")
    lo2 = _tile_reduce(meta["piece_start"], block_m, L, "min")
    n_qt = lo2.shape[1]
    tile_end = (torch.arange(1, n_qt + 1, device=lo2.device, dtype=torch.int32) * block_m).clamp(max=L)
    b1 = (tile_end + block_n - 1) // block_n
    b0 = lo2 // block_n
    a0 = lo1 // block_n
    a1 = (hi1 + block_n - 1) // block_n
    has_a = hi1 > lo1
    merged = has_a & (a1 >= b0)
    b0 = torch.where(merged, torch.minimum(a0, b0), b0)
    keep_a = has_a & ~merged
    a0 = torch.where(keep_a, a0, 0)
    a1 = torch.where(keep_a, a1, 0)
    return torch.stack([a0, a1, b0, b1.expand_as(b0)], dim=2).to(torch.int32).contiguous()


def key_schedule(meta: dict, L: int, block_m: int, block_n: int) -> torch.Tensor:
    """[b, n_ktiles, 2] int32: query-tile range [lo, hi) each key tile is seen by."""
    # a prefix key is read by its group up to the group's end, a candidate's key by its own candidate
    q_end = torch.where(meta["is_prefix"], meta["group_end"], meta["piece_end"])
    hi = _tile_reduce(q_end, block_n, 0, "max")
    n_kt = hi.shape[1]
    lo = torch.arange(n_kt, device=hi.device, dtype=torch.int32) * block_n // block_m
    hi = (hi + block_m - 1) // block_m
    return torch.stack([lo.expand_as(hi), hi], dim=2).to(torch.int32).contiguous()


def tile_schedule(layout: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tiles the kernels visit, as bool matrices: forward / dQ [b, n_qtiles, n_ktiles] (query tile
    visits key tile) and dK/dV [b, n_ktiles, n_qtiles] (key tile visits query tile), for tiles of
    block_m queries and block_n keys."""
    L = layout.shape[-1]
    meta = token_metadata(layout)
    fwd = query_schedule(meta, L, block_m, block_n).long()
    kv = key_schedule(meta, L, block_m, block_n).long()
    n_qt, n_kt = fwd.shape[1], kv.shape[1]
    kt = torch.arange(n_kt, device=layout.device)
    qt = torch.arange(n_qt, device=layout.device)
    a0, a1, b0, b1 = (fwd[..., i, None] for i in range(4))
    q_visits = ((kt >= a0) & (kt < a1)) | ((kt >= b0) & (kt < b1))
    k_visits = (qt >= kv[..., 0, None]) & (qt < kv[..., 1, None])
    return q_visits, k_visits


def visible_pairs(layout: torch.Tensor) -> torch.Tensor:
    """Number of visible (query, key) pairs per row [b] (int64), padding excluded; no dense mask."""
    meta = token_metadata(layout)
    L = layout.shape[-1]
    i = torch.arange(L, device=layout.device, dtype=torch.int64)
    own = i - meta["piece_start"].long() + 1
    prefix = torch.where(meta["is_cand"], (meta["prefix_end"] - meta["group_start"]).long(), 0)
    return torch.where(meta["pad"], 0, own + prefix).sum(1)


def attention_flops(layout: torch.Tensor, num_heads: int, head_dim: int, backward: bool = True) -> int:
    """Useful FLOPs of one forward (+ backward): 4 * d * pairs * hq, times 3.5 with the backward (2.5x)."""
    fwd = 4 * head_dim * int(visible_pairs(layout).sum()) * num_heads
    return int(fwd * 3.5) if backward else fwd
