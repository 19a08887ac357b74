"""train.fp8=rowwise scales each row of every operand on its own (engine/model/fp8_linear.py).

Its scales are powers of two, and scaling by a power of two changes none of the FP8 digits of a value
that stays a normal number: wherever every row ends up normal, one power-of-two scale per tensor gives
the same products bit for bit (checked: the recipe with each row's scale replaced by its tensor's gave
y, dx and dW equal to the bit on the random data of tests/engine/model/test_fp8_linear.py, whose tests
all passed), so comparisons against torchao or full precision on data of one magnitude cannot tell the
two apart. What tells them apart is a row far smaller than the rest: per tensor it falls below the
format's smallest subnormal and is flushed to zero, per row it keeps the format's mantissa bits. Each
of the three products scales its operands along its contraction dimension: forward x and W along K,
dgrad dy and W along N, wgrad dy and x along the tokens M. One slice for each of those six scalings is
made TINY times smaller than the rest, and the result that slice feeds must keep FP8's relative
precision (the bound of that file's single token or output feature: an e5m2 gradient rounds by up to
2^-3).
"""
from __future__ import annotations

import torch

from engine.model import fp8_linear as fl

M, K, N = 32, 64, 48
# e5m2 (gradients) spans 2^32 from its smallest subnormal (2^-16) to its largest value (57344), e4m3 about 2^18:
# below that share of its tensor's largest value a slice is flushed by one scale per tensor
TINY = 2.0 ** -34
# (slice name, its place in x / w / dy, the result it feeds: result name and index)
SLICES = [
    ("forward x per token", ("x", (3, slice(None))), ("y", (3, slice(None)))),
    ("forward W per output", ("w", (5, slice(None))), ("y", (slice(None), 5))),
    ("dgrad dy per token", ("dy", (7, slice(None))), ("dx", (7, slice(None)))),
    ("dgrad W per input", ("w", (slice(None), 13)), ("dx", (slice(None), 13))),
    ("wgrad x per input", ("x", (slice(None), 9)), ("dw", (slice(None), 9))),
    ("wgrad dy per output", ("dy", (slice(None), 11)), ("dw", (11, slice(None)))),
]


def _errors(recipe: str) -> dict:
    """{slice name: relative error of the result it feeds, against float64}."""
    gen = torch.Generator().manual_seed(3)
    t = {"x": torch.randn(M, K, generator=gen), "w": torch.randn(N, K, generator=gen) * 0.05,
         "dy": torch.randn(M, N, generator=gen)}
    for _, (name, index), _ in SLICES:
        t[name][index] *= TINY
    x, w = t["x"].clone().requires_grad_(), t["w"].clone().requires_grad_()
    y = fl.fp8_linear(x, w, None, recipe)
    y.backward(t["dy"])
    x64, w64, dy64 = t["x"].double(), t["w"].double(), t["dy"].double()
    got = {"y": y.detach(), "dx": x.grad, "dw": w.grad}
    want = {"y": x64 @ w64.t(), "dx": dy64 @ w64, "dw": dy64.t() @ x64}
    return {name: ((got[r][i].double() - want[r][i]).norm() / want[r][i].norm()).item()
            for name, _, (r, i) in SLICES}


def test_rowwise_keeps_fp8_precision_in_a_row_far_smaller_than_the_others():
    errors = _errors("rowwise")
    assert all(e < 0.15 for e in errors.values()), errors


def test_one_scale_per_tensor_flushes_such_a_row():
    """The control: the test above fails where a scale spans the whole tensor."""
    errors = _errors("tensorwise")
    assert all(e > 0.5 for e in errors.values()), errors
