import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.loss import contrastive_loss, infonce_sums, pairwise_sums


def groups_batch(sizes, seed=0, scale=1.0):
    """Rewards for groups of the given sizes, candidate 0 of each group positive."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    rewards = (torch.randn(n, generator=g, dtype=torch.float64) * scale).requires_grad_()
    cand_group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    starts = np.cumsum([0] + sizes[:-1])
    labels = torch.zeros(n, dtype=torch.long)
    labels[starts] = 1
    pos = torch.tensor([s for s, k in zip(starts, sizes) for _ in range(k - 1)])
    neg = torch.tensor([s + j for s, k in zip(starts, sizes) for j in range(1, k)])
    return rewards, SimpleNamespace(pair_pos=pos, pair_neg=neg, cand_group=cand_group, labels=labels,
                                    num_groups=len(sizes))


def test_pairwise_matches_polar_eq7():
    r = torch.tensor([1.5, -0.5, 0.2, 0.9], dtype=torch.float64)
    loss, correct, pairs = pairwise_sums(r, torch.tensor([0, 2]), torch.tensor([1, 3]))
    expected = -math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(0.7)))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert correct.item() == 1.0 and pairs.item() == 2.0


def test_ties_count_half():
    r = torch.zeros(4, dtype=torch.float64)
    _, correct, _ = pairwise_sums(r, torch.tensor([0, 2]), torch.tensor([1, 3]))
    assert correct.item() == 1.0


def test_infonce_matches_softmax_and_reduces_to_pairwise_for_k2():
    rewards, b = groups_batch([2, 5, 3, 16])
    loss, count = infonce_sums(rewards, b.pair_pos, b.pair_neg)
    expected = 0.0
    for gi in range(b.num_groups):
        rg = rewards[b.cand_group == gi]
        expected += (torch.logsumexp(rg, 0) - rg[0]).item()
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert count.item() == 4
    r2, b2 = groups_batch([2, 2, 2], seed=3)
    assert infonce_sums(r2, b2.pair_pos, b2.pair_neg)[0].item() == pytest.approx(
        pairwise_sums(r2, b2.pair_pos, b2.pair_neg)[0].item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["pairwise", "infonce"])
def test_stable_for_huge_rewards(kind):
    rewards, b = groups_batch([3, 4], scale=1e4)
    loss, count, stats = contrastive_loss(kind, rewards, b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rewards.grad).all()
    assert torch.isfinite(stats).all()


@pytest.mark.parametrize("kind", ["pairwise", "infonce"])
def test_gradients_match_autograd_of_naive_formula(kind):
    rewards, b = groups_batch([2, 4, 3], seed=7)
    loss, _, _ = contrastive_loss(kind, rewards, b)
    (g,) = torch.autograd.grad(loss, rewards)
    r = rewards.detach().clone().requires_grad_()
    if kind == "pairwise":
        naive = -torch.log(torch.sigmoid(r[b.pair_pos] - r[b.pair_neg])).sum()
    else:
        naive = sum(-torch.log_softmax(r[b.cand_group == gi], 0)[0] for gi in range(b.num_groups))
    (g2,) = torch.autograd.grad(naive, r)
    torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-12)


# ---- InfoNCE of well-separated groups -----------------------------------------------------------
# loss_p = log(1 + T_p), T_p = sum_q exp(d_pq): below T ~ 6e-8 (fp32) or 1e-16 (fp64), 1 + T rounds to 1
# and a log of it loses all of T. Every implementation is held against an fp64 oracle, log1p of an
# exactly rounded sum of exps, over groups whose largest margin M runs from -100 (loss 5e-44) to +100.

U32, U64 = 2.0 ** -24, 2.0 ** -53  # unit roundoffs
# Relative bound for an fp32 implementation: a group has K - 1 <= 15 pairs, so the loss takes K - 1
# exps (1 ulp each; the margins are exact), K - 2 roundings of their sum, a rescale by exp(M) and
# log1p (2 ulp, condition number <= 1 for T > 0): about (K + 4) u <= 20 u; 32 u leaves room for the
# loss sum over the few groups of a case. The gradient (softmax weights) has the same terms.
RTOL32 = 32 * U32
# Below fp32's smallest normal number (losses past M ~ -87) values are multiples of 2^-149: each of
# the <= 15 subnormal terms is off by up to half of that, as is exp(M) times S <= 15 in the C++ form.
ATOL32 = 16 * 2.0 ** -149
SEPARATED_MARGINS = np.arange(-100.0, 100.5, 0.5)
# (positive's reward, its negatives' distances below the largest margin): K = 2, 5 and 16; the last
# has three negatives tied at the maximum. Rewards are multiples of 1/4 under 128, so they and every
# margin are exact in fp32 and the fp64 oracle sees exactly the inputs of the implementation.
SEPARATED_GROUPS = ((0.0, (0.0,)), (-2.5, (0.0, 0.75, 2.5, 6.0)),
                    (1.75, (0.0, 0.0, 0.0) + tuple(0.5 * np.arange(1, 13))))


def separated_case(margin):
    """-> (rewards float64, pair_pos, pair_neg, loss, grad): groups whose largest margin d_pq is `margin`,
    with the oracle loss sum and its gradient wrt the rewards."""
    rewards, pos, neg, loss = [], [], [], []
    grad = np.zeros(sum(1 + len(offsets) for _, offsets in SEPARATED_GROUPS))
    for r_pos, offsets in SEPARATED_GROUPS:
        p = len(rewards)
        rewards.append(r_pos)
        d = [margin - off for off in offsets]
        total = math.fsum(math.exp(x) for x in d)
        loss.append(math.log1p(total))
        for x in d:
            pos.append(p)
            neg.append(len(rewards))
            rewards.append(r_pos + x)
            grad[len(rewards) - 1] = math.exp(x) / (1.0 + total)
        grad[p] = -math.fsum(grad[p + 1:len(rewards)])
    return (torch.tensor(rewards, dtype=torch.float64), torch.tensor(pos), torch.tensor(neg), math.fsum(loss),
            grad)


def assert_near_oracle(got, ref, rtol, atol, what):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    err = np.abs(got - ref)
    bad = err > rtol * np.abs(ref) + atol
    assert not bad.any(), f"{what}: {got[bad]} against {ref[bad]} (relative {(err / np.abs(ref))[bad]})"


def check_separated_infonce(fn, dtype=torch.float32, loss_rtol=RTOL32, loss_atol=ATOL32):
    """fn(rewards, pair_pos, pair_neg) -> (loss sum, count, grad) against the oracle at every margin.
    Gradients are held to the fp32 bounds in any dtype: the kernels and the C++ reference return fp32."""
    for margin in SEPARATED_MARGINS:
        rewards, pos, neg, loss, grad = separated_case(margin)
        got_loss, count, got_grad = fn(rewards.to(dtype), pos, neg)
        assert float(count) == len(SEPARATED_GROUPS)
        assert_near_oracle(float(got_loss), loss, loss_rtol, loss_atol, f"loss at margin {margin}")
        assert_near_oracle(got_grad, grad, RTOL32, ATOL32, f"gradient at margin {margin}")


def test_infonce_of_well_separated_groups_keeps_its_relative_precision():
    """The torch reference in fp32, and in fp64 to the same 32 ulp of its own precision. It took
    log(s + 1) where M = 0: in fp32 the loss was 0 below M = -16.6 (true 6e-8, down to 5e-44) and 9e-4
    off (relative) at M = -10; in fp64 it was 0 below M ~ -37."""
    def reference(rewards, pos, neg):
        r = rewards.clone().requires_grad_()
        loss, count = infonce_sums(r, pos, neg)
        loss.backward()
        assert loss.dtype == rewards.dtype
        return loss.item(), count.item(), r.grad

    check_separated_infonce(reference)
    check_separated_infonce(reference, torch.float64, loss_rtol=32 * U64, loss_atol=0.0)


def test_unknown_loss_names_the_setting():
    rewards, b = groups_batch([2])
    with pytest.raises(ValueError, match="train.loss"):
        contrastive_loss("hinge", rewards, b)
