"""Pieces shared by the attention kernel's interpreter tests and its GPU tests (tests/gpu): the
float64-able dense-mask reference, random groups, one forward + backward, the error measure.

Importing this module sets nothing (the interpreter test module sets TRITON_INTERPRET itself)."""
import numpy as np
import torch
import torch.nn.functional as F

from engine.packing import Group, collate, dense_mask

NAMES = ("out", "dq", "dk", "dv")


def reference(q, k, v, layout, scale):
    """Dense-mask SDPA, the torch backend's math, in whatever dtype q comes in."""
    s, b, hq, d = q.shape
    mask = dense_mask(layout).unsqueeze(1)
    out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                         attn_mask=mask, scale=scale, enable_gqa=k.shape[2] != hq)
    return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)


def random_group(rng, p, cands, vocab=50):
    """A group with prefix length p and candidates of the given lengths; the first is the positive."""
    labels = np.zeros(len(cands), dtype=np.int8)
    labels[0] = 1
    return Group(rng.integers(1, vocab, size=p, dtype=np.int32),
                 [rng.integers(1, vocab, size=c, dtype=np.int32) for c in cands], labels)


def run(fn, q, k, v, grad, layout, dtype, **kw):
    """[out, dq, dk, dv] of fn on q, k, v cast to dtype, with the upstream gradient grad."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, layout, q.shape[-1] ** -0.5, **kw)
    out.backward(grad.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref|; NaN anywhere gives inf, so it never passes a bound."""
    err = ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    return float("inf") if err != err else err


def random_layout(seed, b, n_groups, k_range=(2, 5), p_max=20, c_max=10, pad_max=8):
    """b rows of ragged groups (prefix and candidate lengths from 1, some rows filled exactly)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        rows.append([random_group(rng, int(rng.integers(1, p_max + 1)),
                                  [int(rng.integers(1, c_max + 1)) for _ in range(int(rng.integers(*k_range)))])
                     for _ in range(n_groups)])
    longest = max(sum(len(g) for g in row) for row in rows)
    return collate(rows, longest + int(rng.integers(0, pad_max + 1)), pad_id=0).layout


def tile_aligned_case(rng, t: int):
    """Two groups whose pieces are whole tiles of t tokens, for proving that masked tiles are never
    visited: group 1 = prefix 2t, candidates t, 2t, t; group 2 = prefix t, candidates t, t; then t
    tokens of padding (10t in all).

    Returns the layout, the token ranges to poison (`sibling`: group 1's candidate 2, in K and V;
    `other`: all of group 2, in Q, K and V) and, per output, the rows the poison must not reach
    (the outputs and dq of group 1's prefix and candidates 1 and 3; dk and dv of those candidates)."""
    g1 = random_group(rng, 2 * t, [t, 2 * t, t])
    g2 = random_group(rng, t, [t, t])
    layout = collate([[g1, g2]], 10 * t, pad_id=0).layout
    seen = torch.cat([torch.arange(0, 3 * t), torch.arange(5 * t, 6 * t)])
    own = torch.cat([torch.arange(2 * t, 3 * t), torch.arange(5 * t, 6 * t)])
    return layout, slice(3 * t, 5 * t), slice(6 * t, 9 * t), {"out": seen, "dq": seen, "dk": own, "dv": own}


def poison(q, k, v, sibling: slice, other: slice):
    """Copies of q, k, v with NaN in the sibling's keys and values and in all of the other group."""
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    kp[sibling] = float("nan")
    vp[sibling] = float("nan")
    for x in (qp, kp, vp):
        x[other] = float("nan")
    return qp, kp, vp
