"""The InfoNCE loss of well-separated groups on a CUDA GPU, Triton and CUDA (engine._C_cuda), against the
fp64 oracle of tests/engine/test_loss.py over its sweep (largest margin -100..100 in steps of 0.5, groups
of K = 2, 5 and 16, every reward and margin exact in fp32), loss and gradient.

On CPU the Triton kernel (interpreter) and the shared header the CUDA kernels compile (in float) are held
to 32 ulp plus 16 * 2^-149. Two things only the GPU does widen that, and nothing else:
- fp32 atomic adds to global memory flush subnormal inputs and results to zero whatever nvcc's -ftz
  (CUDA C++ Programming Guide, "Floating-Point Standard"). Both implementations sum the gradient so,
  and Triton also each positive's sum of exps: a sum loses its terms under 2^-126, which add up to
  at most 6.1 * 2^-126 in this sweep (every group's, at any margin); the bound is 16 * 2^-126. The
  CUDA loss merges its state by compare-and-swap of values computed with expf and log1pf (nvcc's
  defaults: -ftz=false, -prec-div=true), so it keeps the CPU's relative bound and its subnormal
  losses: held to twice the CPU's absolute bound there, as CUDA documents expf to 2 ulp where the
  CPU's is under 1 (a loss past margin -87 is exp(M) times S <= 4.6 a group).
- Triton's tl.exp in fp32 is ex2.approx.f32 of x * log2(e) rounded to fp32: the product's rounding is
  an error of up to |x| log2(e) u in the exponent, 1.2 |x| u relative in the result, on top of ex2's
  own few ulp. The exps' most negative argument here is x = min(margin, 0) - 6 (6: the widest offset
  of a negative below its group's largest margin), 130 u at margin -100; the bound adds 2 |x| u. An
  emulation of the kernel (that exp with a 2^-22 error of its own, fp32 arithmetic, flushing atomics)
  used at most 46% of it; the old log(1 + T) is 15,000 u off at margin -10 and 0 below -16.6.
The worst errors measured are reported (the `report` fixture: tests/gpu/run_all.sh's table).
"""
import numpy as np
import pytest

from tests.engine.test_loss import (ATOL32, RTOL32, SEPARATED_GROUPS, SEPARATED_MARGINS, U32, assert_near_oracle,
                                    separated_case)

TINY32 = 2.0 ** -126  # fp32's smallest normal number
FTZ_ATOL = 16 * TINY32
WIDEST_OFFSET = max(max(offsets) for _, offsets in SEPARATED_GROUPS)


def _infonce(name):
    if name == "triton":
        from engine.kernels import contrastive_loss as module
    else:
        from engine.kernels import cuda_ops as module  # ImportError names the build command
    return module.infonce_loss


def _bounds(name, margin):
    """(loss rtol, loss atol, gradient rtol, gradient atol) at this largest margin."""
    if name == "cuda":
        return RTOL32, 2 * ATOL32, RTOL32, FTZ_ATOL
    rtol = RTOL32 + 2 * (max(0.0, -margin) + WIDEST_OFFSET) * U32
    return rtol, FTZ_ATOL, rtol, FTZ_ATOL


def _ulps(got, ref):
    """The worst relative error in units of U32 over the normal fp32 range, and how many of the
    oracle's values in fp32's subnormal range came back 0 (flushed)."""
    got, ref = np.atleast_1d(got), np.atleast_1d(ref)
    size = np.abs(ref)
    normal = size >= TINY32
    worst = float((np.abs(got - ref)[normal] / size[normal]).max(initial=0.0)) / U32
    return worst, int(((got == 0) & (size >= 2.0 ** -149) & ~normal).sum())


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_infonce_of_well_separated_groups_against_the_fp64_oracle(name, report):
    infonce = _infonce(name)
    worst = {"loss": (0.0, None), "gradient": (0.0, None)}
    flushed = 0
    for margin in SEPARATED_MARGINS:
        rewards, pos, neg, loss, grad = separated_case(margin)
        r = rewards.float().cuda().requires_grad_()
        got_loss, count = infonce(r, pos.cuda(), neg.cuda())
        got_loss.backward()
        assert float(count) == len(SEPARATED_GROUPS)
        got_loss, got_grad = got_loss.item(), r.grad.double().cpu().numpy()
        loss_rtol, loss_atol, grad_rtol, grad_atol = _bounds(name, margin)
        assert_near_oracle(got_loss, loss, loss_rtol, loss_atol, f"{name}: loss at margin {margin}")
        assert_near_oracle(got_grad, grad, grad_rtol, grad_atol, f"{name}: gradient at margin {margin}")
        for what, g, want in (("loss", got_loss, loss), ("gradient", got_grad, grad)):
            ulps, zeros = _ulps(g, want)
            flushed += zeros
            if ulps >= worst[what][0]:
                worst[what] = (ulps, margin)
    report(f"InfoNCE {name} against the fp64 oracle (margins -100..100, fp32): worst relative error "
           f"{worst['loss'][0]:.1f} ulp (loss, at margin {worst['loss'][1]}), {worst['gradient'][0]:.1f} ulp "
           f"(gradient, at margin {worst['gradient'][1]}) over normal values; {flushed} subnormal values came back 0")
