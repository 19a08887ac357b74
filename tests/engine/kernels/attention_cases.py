"""Pieces shared by the attention kernel's interpreter tests and its GPU tests (tests/gpu): the
float64-able dense-mask reference, random groups, one forward + backward, the error measure.

Importing this module sets nothing (the interpreter test module sets TRITON_INTERPRET itself)."""
import numpy as np
import torch.nn.functional as F

from engine.packing import Group, dense_mask

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
