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


def test_unknown_loss_names_the_setting():
    rewards, b = groups_batch([2])
    with pytest.raises(ValueError, match="train.loss"):
        contrastive_loss("hinge", rewards, b)
