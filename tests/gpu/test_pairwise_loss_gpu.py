"""The pairwise (Bradley-Terry) loss on a CUDA GPU, Triton and CUDA (engine._C_cuda), against an fp64
oracle, softplus(-m) = max(-m, 0) + log1p(exp(-|m|)) in float64, over margins m = -100..100 in steps of
0.5: from |m| = 15 on the pairs are well separated, exp(-|m|) is at most 3.1e-7, and log(1 + exp(-m)) in
fp32 is 0 past m = 16.6 (the kernels' log1p keeps it: engine/kernels/contrastive_loss.py, _log1p). Each
margin is scored as three pairs (r + m, r) at the rewards r of NEGATIVES, every reward and margin exact
in fp32, so the oracle sees exactly the inputs of the implementation; loss, correct count and gradient.

On CPU (tests/engine/kernels/test_contrastive_loss.py) the Triton kernel in the interpreter is held to
1e-6 of the fp64 loss at margins 8..60. On the GPU, per pair, as for InfoNCE (tests/gpu/test_infonce_gpu.py):
- Relative bound 32 ulp (tests/engine/test_loss.py's RTOL32): the loss and the weight sigmoid(-m) take
  one exp (CUDA documents expf to 2 ulp), one log1p or division (2 ulp) and the sum of three equal
  terms (2 roundings); 32 u leaves room.
- Triton's tl.exp in fp32 is ex2.approx.f32 of x * log2(e) rounded to fp32: the product's rounding is an
  error of up to |x| log2(e) u in the exponent, about 1.2 |x| u relative in exp(x), here x = -|m| (130 u
  at |m| = 100), on top of ex2's own 2^-22. The bound adds 2 |m| u to Triton's; the loss where m < 0 is
  -m plus that term and the weight 1 / (1 + exp(m)), where the exp's error shrinks, so the bound is
  loose there.
- Below fp32's smallest normal number 2^-126 (a loss or weight past m ~ 87.3): fp32 atomic adds to
  global memory flush subnormal inputs and results to zero whatever nvcc's -ftz (CUDA C++ Programming
  Guide, "Floating-Point Standard"); both implementations scatter the gradient so, one atomic add per
  reward here (each reward is in one pair), so a gradient entry is off by less than 2^-126; the bound is
  twice that. Triton may also flush the loss terms (its libdevice calls are compiled flush-to-zero: its
  enable_reflect_ftz option, on by default): three terms under 2^-126 each, the bound twice 3 * 2^-126.
  The CUDA loss is summed in registers and shared memory, where nvcc keeps subnormals (-ftz=false):
  twice tests/engine/test_loss.py's ATOL32 (16 * 2^-149), as expf's 2 ulp in the subnormal range are
  multiples of 2^-149.
The worst errors measured are reported (the `report` fixture: tests/gpu/run_all.sh's table).
"""
import math

import numpy as np
import pytest
import torch

from tests.engine.test_loss import ATOL32, RTOL32, SEPARATED_MARGINS, U32, assert_near_oracle
from tests.gpu.test_infonce_gpu import TINY32, _ulps

NEGATIVES = (0.0, -37.25, 64.75)  # each margin's pairs (r + m, r): multiples of 1/4 under 2^20, exact in fp32
GRAD_FTZ_ATOL = 2 * TINY32
LOSS_FTZ_ATOL = 2 * len(NEGATIVES) * TINY32


def _pairwise(name):
    if name == "triton":
        from engine.kernels import contrastive_loss as module
    else:
        from engine.kernels import cuda_ops as module  # ImportError names the build command
    return module.pairwise_loss


def separated_pairs(margin):
    """-> (rewards float64, pair_pos, pair_neg, loss, grad): one pair of margin `margin` at each of
    NEGATIVES, with the fp64 oracle's loss sum and its gradient wrt the rewards."""
    rewards, pos, neg = [], [], []
    for r in NEGATIVES:
        pos.append(len(rewards))
        rewards.append(r + margin)
        neg.append(len(rewards))
        rewards.append(r)
    e = math.exp(-abs(margin))
    loss = max(-margin, 0.0) + math.log1p(e)  # softplus(-m)
    weight = e / (1.0 + e) if margin >= 0 else 1.0 / (1.0 + e)  # sigmoid(-m) = d loss / d r_neg
    grad = np.tile([-weight, weight], len(NEGATIVES))
    return (torch.tensor(rewards, dtype=torch.float64), torch.tensor(pos), torch.tensor(neg),
            len(NEGATIVES) * loss, grad)


def _bounds(name, margin):
    """(loss rtol, loss atol, gradient rtol, gradient atol) at this margin (the module docstring)."""
    if name == "cuda":
        return RTOL32, 2 * ATOL32, RTOL32, GRAD_FTZ_ATOL
    rtol = RTOL32 + 2 * abs(margin) * U32
    return rtol, LOSS_FTZ_ATOL, rtol, GRAD_FTZ_ATOL


def test_the_oracle_is_softplus_and_sigmoid():
    # the oracle itself, on values known in closed form (runs where a GPU is; the kernels' CPU checks
    # are tests/engine/kernels/test_contrastive_loss.py)
    for margin, loss, weight in ((0.0, math.log(2.0), 0.5), (-100.0, 100.0, 1.0), (100.0, math.exp(-100.0),
                                                                                   math.exp(-100.0))):
        rewards, pos, neg, got_loss, grad = separated_pairs(margin)
        assert (rewards[pos] - rewards[neg]).tolist() == [margin] * len(NEGATIVES)
        assert got_loss == pytest.approx(len(NEGATIVES) * loss, rel=1e-15)
        assert grad[1] == pytest.approx(weight, rel=1e-15) and grad[0] == -grad[1]


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_pairwise_loss_of_well_separated_pairs_against_the_fp64_oracle(name, report):
    pairwise = _pairwise(name)
    measured = []  # (ulps of the loss, of the gradient, subnormal values flushed, margin)
    for margin in SEPARATED_MARGINS:
        rewards, pos, neg, loss, grad = separated_pairs(margin)
        r = rewards.float().cuda().requires_grad_()
        got_loss, correct, pairs = pairwise(r, pos.cuda(), neg.cuda())
        got_loss.backward()
        want_correct = len(NEGATIVES) * (1.0 if margin > 0 else 0.5 if margin == 0 else 0.0)
        assert float(correct) == want_correct and float(pairs) == len(NEGATIVES), (margin, correct, pairs)
        got_loss, got_grad = got_loss.item(), r.grad.double().cpu().numpy()
        loss_rtol, loss_atol, grad_rtol, grad_atol = _bounds(name, margin)
        assert_near_oracle(got_loss, loss, loss_rtol, loss_atol, f"{name}: loss at margin {margin}")
        assert_near_oracle(got_grad, grad, grad_rtol, grad_atol, f"{name}: gradient at margin {margin}")
        (loss_ulps, loss_zeros), (grad_ulps, grad_zeros) = _ulps(got_loss, loss), _ulps(got_grad, grad)
        measured.append((loss_ulps, grad_ulps, loss_zeros + grad_zeros, margin))
    worst_loss = max(measured, key=lambda m: m[0])
    worst_grad = max(measured, key=lambda m: m[1])
    report(f"pairwise {name} against the fp64 oracle (margins -100..100, fp32): worst relative error "
           f"{worst_loss[0]:.1f} ulp (loss, at margin {worst_loss[3]}), {worst_grad[1]:.1f} ulp (gradient, at "
           f"margin {worst_grad[3]}) over normal values; {sum(m[2] for m in measured)} subnormal values came back 0")
