"""Fused contrastive losses over (positive, negative) reward pairs.

Same semantics as `engine.loss.pairwise_sums` and `engine.loss.infonce_sums`; all arithmetic in fp32.

Pairwise (Bradley-Terry), one kernel, one pass over the pairs j = (p, q):
    m_j        = r_p - r_q
    loss_sum   = sum_j softplus(-m_j),   softplus(z) = max(z, 0) + log1p(exp(-|z|))   (stable for any |z|)
    correct    = sum_j [m_j > 0] + 1/2 [m_j == 0]
    dloss/dr_p -= sigmoid(-m_j),  dloss/dr_q += sigmoid(-m_j)
with sigmoid(-m) = exp(-|m|)/(1+exp(-|m|)) for m >= 0 and 1/(1+exp(-|m|)) otherwise. The gradient of
loss_sum wrt the rewards is accumulated with atomics during the forward pass; the backward scales it
by the incoming gradient. Loss and count are reduced per block and summed over blocks in torch.

InfoNCE over the positives p of a group (pairs (p, q) list its negatives q), d_pq = r_q - r_p:
    M_p       = max(0, max_q d_pq)
    S_p       = sum_q exp(d_pq - M_p)
    loss_p    = M_p + log1p(X_p)                   (= log(1 + sum_q exp(d_pq)))
    X_p       = S_p if M_p = 0, else (S_p - 1) + exp(-M_p)    (= S_p + exp(-M_p) - 1 >= 0)
    dloss_p/dr_q = exp(d_pq - M_p) / (S_p + exp(-M_p)),   dloss_p/dr_p = -sum_q dloss_p/dr_q
Three passes over the pairs (atomic max for M, atomic add for S, atomic add of the gradient) and one
over the rewards (the per-positive loss, for positives with at least one pair).

A pair index outside [0, n) is never read or written: checking on the host would cost a device sync
every step, so, as the CUDA kernels do, such a pair makes the loss sum NaN (which the training loop's
non-finite check reports) and adds nothing to the counts or the gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P = 1024


@triton.jit
def _sum(x, axis: tl.constexpr):
    # tl.sum is a @triton.jit function of triton.language.standard, which the interpreter cannot call
    # when triton was imported before TRITON_INTERPRET was set (torch._dynamo imports triton).
    # tl.reduce is a builtin, and the interpreter recognises standard's sum combine function by
    # identity and reduces with numpy (a local combine function falls back to a slow python loop).
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _log1p(x):
    # log(1 + x) for x >= 0 to a few ulp, as the CUDA kernels' log1pf (contrastive_math.h): a plain
    # log(1 + x) loses x's low bits when 1 + x rounds, and all of x below 6e-8 (a pair whose margin is
    # past 16.6 had loss 0; at margin 8, 2e-5 relative error, torch's fp32 softplus 1e-8). Goldberg's
    # correction: u = fl(1 + x), log1p(x) = log(u) * x / (u - 1), where u - 1 is exact for u < 2^24 and
    # x / (u - 1) corrects the rounding of 1 + x (tl.log is __nv_logf).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _valid_pairs(pos_ptr, neg_ptr, offs, num_pairs, n):
    """-> (p, q, in_pairs, valid): the pairs at offs, which lanes hold a pair, which of those index in [0, n)."""
    in_pairs = offs < num_pairs
    p = tl.load(pos_ptr + offs, mask=in_pairs, other=0)
    q = tl.load(neg_ptr + offs, mask=in_pairs, other=0)
    valid = in_pairs & (p >= 0) & (p < n) & (q >= 0) & (q < n)
    return p, q, in_pairs, valid


@triton.jit
def _pairwise_kernel(
    rewards_ptr, pos_ptr, neg_ptr, grad_ptr, partial_ptr, num_pairs, n, nan,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    p, q, in_pairs, mask = _valid_pairs(pos_ptr, neg_ptr, offs, num_pairs, n)
    rp = tl.load(rewards_ptr + p, mask=mask, other=0.0).to(tl.float32)
    rq = tl.load(rewards_ptr + q, mask=mask, other=0.0).to(tl.float32)
    m = rp - rq
    e = tl.exp(-tl.abs(m))
    loss = tl.maximum(-m, 0.0) + _log1p(e)
    correct = tl.where(m > 0, 1.0, tl.where(m == 0, 0.5, 0.0))
    sig_neg = tl.where(m >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # sigmoid(-m)
    tl.atomic_add(grad_ptr + p, -sig_neg, mask=mask)
    tl.atomic_add(grad_ptr + q, sig_neg, mask=mask)
    tl.store(partial_ptr + pid * 2, _sum(tl.where(mask, loss, tl.where(in_pairs, nan, 0.0)), 0))
    tl.store(partial_ptr + pid * 2 + 1, _sum(tl.where(mask, correct, 0.0), 0))


@triton.jit
def _infonce_pair(rewards_ptr, pos_ptr, neg_ptr, offs, num_pairs, n):
    """-> (p, q, d = r_q - r_p in fp32, valid) for the pairs at offs; lanes not valid read nothing."""
    p, q, in_pairs, valid = _valid_pairs(pos_ptr, neg_ptr, offs, num_pairs, n)
    d = tl.load(rewards_ptr + q, mask=valid, other=0.0).to(tl.float32) - \
        tl.load(rewards_ptr + p, mask=valid, other=0.0).to(tl.float32)
    return p, q, d, valid


@triton.jit
def _infonce_max_kernel(rewards_ptr, pos_ptr, neg_ptr, max_ptr, num_pairs, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p, q, d, mask = _infonce_pair(rewards_ptr, pos_ptr, neg_ptr, offs, num_pairs, n)
    tl.atomic_max(max_ptr + p, d, mask=mask)  # max_ptr starts at 0, so M_p >= 0


@triton.jit
def _infonce_sum_kernel(rewards_ptr, pos_ptr, neg_ptr, max_ptr, sum_ptr, num_pairs, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p, q, d, mask = _infonce_pair(rewards_ptr, pos_ptr, neg_ptr, offs, num_pairs, n)
    mp = tl.load(max_ptr + p, mask=mask, other=0.0)
    tl.atomic_add(sum_ptr + p, tl.exp(d - mp), mask=mask)


@triton.jit
def _infonce_grad_kernel(rewards_ptr, pos_ptr, neg_ptr, max_ptr, sum_ptr, grad_ptr, num_pairs, n,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p, q, d, mask = _infonce_pair(rewards_ptr, pos_ptr, neg_ptr, offs, num_pairs, n)
    mp = tl.load(max_ptr + p, mask=mask, other=0.0)
    sp = tl.load(sum_ptr + p, mask=mask, other=1.0)
    wgt = tl.exp(d - mp) / (sp + tl.exp(-mp))
    tl.atomic_add(grad_ptr + q, wgt, mask=mask)
    tl.atomic_add(grad_ptr + p, -wgt, mask=mask)


@triton.jit
def _infonce_loss_kernel(max_ptr, sum_ptr, count_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    mp = tl.load(max_ptr + offs, mask=mask, other=0.0)
    sp = tl.load(sum_ptr + offs, mask=mask, other=0.0)
    cnt = tl.load(count_ptr + offs, mask=mask, other=0.0)
    has_pair = mask & (cnt > 0)
    # The denominator's excess over 1, without forming 1 + S_p where M_p = 0: there S_p is the whole
    # sum of exps, which 1 + S_p lost below 6e-8 (a well-separated group's loss read 0). S_p >= 1 where
    # M_p > 0 (its largest term is exp(0)), and S_p - 1 is exact for 1 <= S_p < 2^24.
    excess = tl.where(mp > 0, (sp - 1.0) + tl.exp(-mp), sp)
    loss = tl.where(has_pair, mp + _log1p(excess), 0.0)
    tl.store(partial_ptr + pid * 2, _sum(loss, 0))
    tl.store(partial_ptr + pid * 2 + 1, _sum(tl.where(has_pair, 1.0, 0.0), 0))


@triton.jit
def _count_kernel(pos_ptr, neg_ptr, count_ptr, bad_ptr, num_pairs, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p, q, in_pairs, mask = _valid_pairs(pos_ptr, neg_ptr, offs, num_pairs, n)
    ones = tl.full([BLOCK], 1.0, tl.float32)
    tl.atomic_add(count_ptr + p, ones, mask=mask)
    tl.atomic_add(bad_ptr + offs * 0, ones, mask=in_pairs & ~mask)  # pairs out of range, poison the loss


def _empty(shape, device, dtype):
    """Buffers the kernels write in full (tests swap in a NaN-filled allocator to prove it)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _check(rewards, pair_pos, pair_neg):
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-d, got {tuple(rewards.shape)}")
    # the kernels read any dtype; integer rewards would come back as a truncated loss
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    for name, t in (("pair_pos", pair_pos), ("pair_neg", pair_neg)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64 indices into rewards, got {t.dtype}")
    if pair_pos.shape != pair_neg.shape or pair_pos.dim() != 1:
        raise ValueError(f"pair_pos {tuple(pair_pos.shape)} and pair_neg {tuple(pair_neg.shape)} must be equal 1-d")


def pairwise_fwd(rewards, pair_pos, pair_neg):
    """Launcher: -> (loss_sum fp32 [], correct fp32 [], dloss_sum/drewards fp32 [n])."""
    _check(rewards, pair_pos, pair_neg)
    num_pairs = pair_pos.numel()
    grad = torch.zeros(rewards.shape, device=rewards.device, dtype=torch.float32)
    blocks = triton.cdiv(num_pairs, BLOCK_P)
    if num_pairs == 0:
        partial = torch.zeros((1, 2), device=rewards.device, dtype=torch.float32)
    else:
        partial = _empty((blocks, 2), rewards.device, torch.float32)
        _pairwise_kernel[(blocks,)](
            rewards.contiguous(), pair_pos.contiguous(), pair_neg.contiguous(), grad, partial, num_pairs,
            rewards.numel(), float("nan"), BLOCK=BLOCK_P, num_warps=4,
        )
    sums = partial.sum(0)
    return sums[0].clone(), sums[1].clone(), grad


def infonce_fwd(rewards, pair_pos, pair_neg):
    """Launcher: -> (loss_sum fp32 [], number of positives fp32 [], dloss_sum/drewards fp32 [n])."""
    _check(rewards, pair_pos, pair_neg)
    n = rewards.numel()
    num_pairs = pair_pos.numel()
    dev = rewards.device
    grad = torch.zeros(n, device=dev, dtype=torch.float32)
    mx = torch.zeros(n, device=dev, dtype=torch.float32)
    sm = torch.zeros(n, device=dev, dtype=torch.float32)
    cnt = torch.zeros(n, device=dev, dtype=torch.float32)
    blocks_n = max(1, triton.cdiv(n, BLOCK_P))  # one block even for n = 0: it holds the out-of-range NaN
    if num_pairs == 0:
        partial = torch.zeros((1, 2), device=dev, dtype=torch.float32)
    else:
        partial = _empty((blocks_n, 2), dev, torch.float32)
        r, pp, pn = rewards.contiguous(), pair_pos.contiguous(), pair_neg.contiguous()
        bad = torch.zeros(1, device=dev, dtype=torch.float32)
        grid = (triton.cdiv(num_pairs, BLOCK_P),)
        _count_kernel[grid](pp, pn, cnt, bad, num_pairs, n, BLOCK=BLOCK_P)
        _infonce_max_kernel[grid](r, pp, pn, mx, num_pairs, n, BLOCK=BLOCK_P)
        _infonce_sum_kernel[grid](r, pp, pn, mx, sm, num_pairs, n, BLOCK=BLOCK_P)
        _infonce_grad_kernel[grid](r, pp, pn, mx, sm, grad, num_pairs, n, BLOCK=BLOCK_P)
        _infonce_loss_kernel[(blocks_n,)](mx, sm, cnt, partial, n, BLOCK=BLOCK_P)
        # the loss sum becomes NaN if any pair was out of range, without a host sync
        partial[0, 0] += torch.where(bad[0] > 0, float("nan"), 0.0)
    sums = partial.sum(0)
    return sums[0].clone(), sums[1].clone(), grad


# ---- custom ops ---------------------------------------------------------------------------------
# Each op returns (loss_sum, count, grad) with grad = dloss_sum/drewards from the same pass; only
# loss_sum is differentiable and its backward is grad_loss * grad.

@torch.library.custom_op("polar::pairwise_loss", mutates_args=())
def _pairwise_op(rewards: torch.Tensor, pair_pos: torch.Tensor,
                 pair_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return pairwise_fwd(rewards, pair_pos, pair_neg)


@torch.library.custom_op("polar::infonce_loss", mutates_args=())
def _infonce_op(rewards: torch.Tensor, pair_pos: torch.Tensor,
                pair_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return infonce_fwd(rewards, pair_pos, pair_neg)


def _fake(rewards, pair_pos, pair_neg):
    scalar = rewards.new_empty((), dtype=torch.float32)
    return scalar, rewards.new_empty((), dtype=torch.float32), rewards.new_empty(rewards.shape, dtype=torch.float32)


_pairwise_op.register_fake(_fake)
_infonce_op.register_fake(_fake)


def _setup_context(ctx, inputs, output):
    rewards = inputs[0]
    ctx.save_for_backward(output[2])
    ctx.rewards_dtype = rewards.dtype
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, grad_count, grad_grad):
    (grad,) = ctx.saved_tensors
    return (grad_loss * grad).to(ctx.rewards_dtype), None, None


_pairwise_op.register_autograd(_backward, setup_context=_setup_context)
_infonce_op.register_autograd(_backward, setup_context=_setup_context)


def pairwise_loss(rewards, pair_pos, pair_neg):
    """-> (sum of pair losses, correctly ordered pairs (ties 1/2), number of pairs), like `pairwise_sums`.

    As there, the loss sum and the pair count have the rewards' dtype and the correct count is fp32."""
    loss_sum, correct, _ = _pairwise_op(rewards, pair_pos, pair_neg)
    return (loss_sum.to(rewards.dtype), correct,
            rewards.new_full((), float(pair_pos.numel())))


def infonce_loss(rewards, pair_pos, pair_neg):
    """-> (sum over positives of -log softmax(positive, its negatives), number of positives), like `infonce_sums`."""
    loss_sum, count, _ = _infonce_op(rewards, pair_pos, pair_neg)
    return loss_sum.to(rewards.dtype), count.to(rewards.dtype)
