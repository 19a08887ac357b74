"""Contrastive losses over the candidates of each group (the torch reference).

Pairwise Bradley-Terry (POLAR Eq. 7/8): for every (positive p, negative n) pair of a group,
    loss_pair = -log sigmoid(r_p - r_n) = softplus(r_n - r_p)
K = 2 with one positive reproduces the paper exactly. InfoNCE: for every positive p of a group,
    loss_p = logsumexp(r_p, r_negatives) - r_p  (K = 2: the same as pairwise).

Functions return SUMS and a count. The training step hands both to megatron, which divides the
summed gradients by the count all-reduced over the global batch, so the loss is the mean over all
pairs of the global batch whatever the data-parallel size, micro-batching or packing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_sums(rewards, pair_pos, pair_neg):
    """-> (sum of pair losses, number of correctly ordered pairs (ties 1/2), number of pairs)."""
    margin = rewards[pair_pos] - rewards[pair_neg]
    loss_sum = F.softplus(-margin).sum()
    correct = (margin > 0).float().sum() + 0.5 * (margin == 0).float().sum()
    # new_full launches a fill on the device; torch.tensor(python_number, device=cuda) would copy
    # from host memory inside the training step
    return loss_sum, correct, rewards.new_full((), float(pair_pos.numel()))


def infonce_sums(rewards, pair_pos, pair_neg):
    """-> (sum over positives of -log softmax({positive} + its group's negatives), number of positives).

    Written over the (positive, negative) pairs: loss_p = log(1 + T), T = sum_n exp(r_n - r_p), a
    logsumexp over {0} and the pair margins d, stabilised by M = max(0, max d): s = sum exp(d - M) and
    loss_p = M + log1p(x), x = s + exp(-M) - 1 the excess over 1 of the softmax denominator. Where
    M = 0, x = s = T exactly: log(s + 1) would lose T's low bits when 1 + T rounds, and all of T below
    6e-8 in fp32 (a well-separated group had loss 0). Where M > 0, s >= 1 (its maximum term is
    exp(0)) and x = (s - 1) + exp(-M) is formed without that rounding either.
    """
    n = rewards.numel()
    d = rewards[pair_neg] - rewards[pair_pos]
    m = torch.zeros(n, device=rewards.device, dtype=rewards.dtype)
    m = m.scatter_reduce(0, pair_pos, d.detach(), reduce="amax", include_self=True)  # >= 0
    s = torch.zeros(n, device=rewards.device, dtype=rewards.dtype).index_add(0, pair_pos, (d - m[pair_pos]).exp())
    has_pair = torch.zeros(n, device=rewards.device, dtype=torch.bool)
    has_pair[pair_pos] = True
    per_pos = m + torch.log1p(torch.where(m > 0, (s - 1) + (-m).exp(), s))
    loss_sum = torch.where(has_pair, per_pos, torch.zeros_like(per_pos)).sum()
    return loss_sum, has_pair.sum().to(rewards.dtype)


def contrastive_loss(kind: str, rewards, batch, backend: str = "torch"):
    """-> (loss sum, normaliser count, stats [loss_sum, correct_pairs, pairs]) for one micro-batch."""
    if backend == "triton":
        from engine.kernels.contrastive_loss import infonce_loss as infonce_fn
        from engine.kernels.contrastive_loss import pairwise_loss as pairwise_fn
    elif backend == "cuda":
        from engine.kernels.cuda_ops import infonce_loss as infonce_fn
        from engine.kernels.cuda_ops import pairwise_loss as pairwise_fn
    elif backend == "torch":
        pairwise_fn, infonce_fn = pairwise_sums, infonce_sums
    else:
        raise ValueError(f"train.kernels={backend!r}: expected torch, triton or cuda")
    pair_loss, correct, pairs = pairwise_fn(rewards, batch.pair_pos, batch.pair_neg)
    pairs = pairs.to(rewards.dtype) if torch.is_tensor(pairs) else rewards.new_full((), float(pairs))
    if kind == "pairwise":
        loss_sum, count = pair_loss, pairs
    elif kind == "infonce":
        loss_sum, count = infonce_fn(rewards, batch.pair_pos, batch.pair_neg)
    else:
        raise ValueError(f"train.loss={kind!r}: expected pairwise or infonce")
    stats = torch.stack([loss_sum.detach(), correct.detach(), count.detach(), pairs.detach()])
    return loss_sum, count, stats
