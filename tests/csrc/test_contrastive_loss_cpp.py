"""engine._C pairwise_loss / infonce_loss against engine/loss.py (float64 reference, autograd)."""
import numpy as np
import pytest
import torch

from engine import _C
from engine.loss import infonce_sums, pairwise_sums
from tests.engine.test_loss import U64, check_separated_infonce


def _groups(rng, groups, k, positives=1, scale=1.0, ties=False):
    """Groups of k candidates; the first `positives` of each are positives paired with every negative.
    Pairs are shuffled so that a positive's pairs are not contiguous."""
    n = groups * k
    rewards = (rng.standard_normal(n) * scale).astype(np.float32)
    if ties:
        rewards[1::k] = rewards[0::k]  # first negative ties its group's first positive
    pos, neg = [], []
    for g in range(groups):
        for p in range(positives):
            for q in range(positives, k):
                pos.append(g * k + p)
                neg.append(g * k + q)
    order = rng.permutation(len(pos))
    return rewards, np.asarray(pos, np.int64)[order], np.asarray(neg, np.int64)[order]


def _ref(fn, rewards, pos, neg):
    r = torch.tensor(rewards, dtype=torch.float64, requires_grad=True)
    out = fn(r, torch.from_numpy(pos), torch.from_numpy(neg))
    out[0].backward()
    return [float(x) for x in out[:2]], r.grad.numpy()


def _close(actual, expected, rtol=1e-5, atol_scale=1e-5):
    atol = atol_scale * float(np.abs(expected).max(initial=0.0)) + 1e-30
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


CASES = [
    dict(groups=64, k=2),
    dict(groups=32, k=4, positives=2),
    dict(groups=16, k=8, ties=True),
    dict(groups=8, k=16, positives=3),
    dict(groups=16, k=5, scale=1e4),        # huge margins: softplus / logsumexp must not overflow
    dict(groups=16, k=16, scale=1e4, positives=4),
    dict(groups=4, k=3, scale=1e-6),        # tiny margins
    dict(groups=2500, k=4, scale=3.0),      # n = 1e4 rewards
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_pairwise_matches_reference(case):
    rewards, pos, neg = _groups(np.random.default_rng(len(str(case))), **case)
    (loss_ref, correct_ref), grad_ref = _ref(pairwise_sums, rewards, pos, neg)
    loss, correct, grad = _C.pairwise_loss(rewards, pos, neg)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    _close(loss, loss_ref)
    assert correct == correct_ref  # exact: both compare the same float32 values
    assert grad.dtype == np.float32 and grad.shape == rewards.shape
    _close(grad, grad_ref)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_infonce_matches_reference(case):
    rewards, pos, neg = _groups(np.random.default_rng(len(str(case)) + 1), **case)
    (loss_ref, count_ref), grad_ref = _ref(infonce_sums, rewards, pos, neg)
    loss, count, grad = _C.infonce_loss(rewards, pos, neg)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    _close(loss, loss_ref)
    assert count == count_ref
    _close(grad, grad_ref)


def test_infonce_of_well_separated_groups_keeps_its_relative_precision():
    """Largest margins -100..100 against the fp64 oracle (tests/engine/test_loss.py). The loss is summed
    in double, so it is held to the double form of that bound, 32 ulp; it took log(1 + T) with T the
    sum of exps, which lost T's low bits (2e-9 relative error at M = -20) and all of it below M ~ -37.
    The gradient comes back in float32 and is held to the fp32 bound."""
    check_separated_infonce(lambda rewards, pos, neg: _C.infonce_loss(rewards.numpy(), pos.numpy(), neg.numpy()),
                            loss_rtol=32 * U64, loss_atol=0.0)


def test_k2_infonce_equals_pairwise():
    rewards, pos, neg = _groups(np.random.default_rng(3), 100, 2)
    lp, _, gp = _C.pairwise_loss(rewards, pos, neg)
    li, count, gi = _C.infonce_loss(rewards, pos, neg)
    assert count == 100
    _close(li, lp)
    _close(gi, gp)


def test_pairwise_extreme_values():
    rewards = np.array([1e30, -1e30, 0.0, 0.0], np.float32)
    loss, correct, grad = _C.pairwise_loss(rewards, np.array([0, 1, 2], np.int64), np.array([1, 0, 3], np.int64))
    # pairs (pos, neg): (0, 1) loss 0 grad 0; (1, 0) loss 2e30, d/dr0 = +1, d/dr1 = -1; tie log 2
    assert loss == pytest.approx(2e30 + np.log(2), rel=1e-6)
    assert correct == 1.5
    np.testing.assert_allclose(grad, [1.0, -1.0, -0.5, 0.5])


def test_infonce_extreme_values():
    # the same pairs as test_pairwise_extreme_values: with one pair per positive InfoNCE is pairwise
    rewards = np.array([1e30, -1e30, 0.0, 0.0], np.float32)
    loss, count, grad = _C.infonce_loss(rewards, np.array([0, 1, 2], np.int64), np.array([1, 0, 3], np.int64))
    assert loss == pytest.approx(2e30 + np.log(2), rel=1e-6)
    assert count == 3
    np.testing.assert_allclose(grad, [1.0, -1.0, -0.5, 0.5])


@pytest.mark.parametrize("rewards,pos,neg", [
    ([np.nan, 0.0, 1.0], [0, 0], [1, 2]),             # a NaN positive
    ([np.nan, 0.0, 1.0], [1], [0]),                   # a positive whose only negative is NaN
    ([np.nan, 0.0, 1.0, 2.0], [1, 2, 3], [0, 0, 1]),  # two of three positives see a NaN
])
def test_a_nan_reward_makes_the_loss_nan_and_keeps_its_positive_counted(rewards, pos, neg):
    """As the torch reference: a NaN must reach the loss, not leave its positive out of the loss and
    the count (fmax in the logsumexp merge dropped it, and the state read as "no pair")."""
    rewards, pos, neg = np.array(rewards, np.float32), np.array(pos, np.int64), np.array(neg, np.int64)
    (loss_ref, count_ref), _ = _ref(infonce_sums, rewards, pos, neg)
    loss, count, grad = _C.infonce_loss(rewards, pos, neg)
    assert np.isnan(loss_ref) and np.isnan(loss)
    assert count == count_ref == len(set(pos.tolist()))


@pytest.mark.parametrize("rewards", [
    [0.0, -np.inf, 0.5], [0.0, 0.5, -np.inf],   # a negative at -inf merged before or after a finite one
    [0.0, -np.inf, -np.inf],                     # every margin -inf: loss 0, still one positive
    [np.inf, 1.0, 2.0],                          # the positive at +inf: the same margins
])
def test_a_margin_of_minus_inf_adds_nothing_and_keeps_its_positive_counted(rewards):
    """As the torch reference: exp(-inf) = 0 joins the sum and the positive has a pair. The merge gave
    max = -inf and sum = 0 * exp(-inf + inf) = NaN: the positive read as "no pair" (count 0, gradient
    NaN), and a finite margin merged after it made the loss NaN, so the result hung on pair order."""
    rewards, pos, neg = np.array(rewards, np.float32), np.array([0, 0], np.int64), np.array([1, 2], np.int64)
    (loss_ref, count_ref), grad_ref = _ref(infonce_sums, rewards, pos, neg)
    loss, count, grad = _C.infonce_loss(rewards, pos, neg)
    assert count == count_ref == 1
    assert np.isfinite(loss_ref) and np.isfinite(grad_ref).all()
    _close(loss, loss_ref)
    _close(grad, grad_ref)


def test_no_pairs_and_unpaired_candidates():
    rewards = np.arange(5, dtype=np.float32)
    empty = np.zeros(0, np.int64)
    assert _C.pairwise_loss(rewards, empty, empty)[:2] == (0.0, 0.0)
    loss, count, grad = _C.infonce_loss(rewards, empty, empty)
    assert (loss, count) == (0.0, 0.0) and not grad.any()
    # candidate 4 is in no pair: zero gradient; positive 0 has two pairs, positive 2 one
    pos, neg = np.array([0, 2, 0], np.int64), np.array([1, 3, 3], np.int64)
    (loss_ref, count_ref), grad_ref = _ref(infonce_sums, rewards, pos, neg)
    loss, count, grad = _C.infonce_loss(rewards, pos, neg)
    assert count == count_ref == 2
    _close(loss, loss_ref)
    _close(grad, grad_ref)
    assert grad[4] == 0.0


@pytest.mark.parametrize("fn", ["pairwise_loss", "infonce_loss"])
@pytest.mark.parametrize("which,bad", [("pair_pos", 6), ("pair_neg", -1), ("pair_neg", 100)])
def test_out_of_range_pair_index(fn, which, bad):
    rewards = np.zeros(6, np.float32)
    idx = {"pair_pos": np.array([0, 2, 4], np.int64), "pair_neg": np.array([1, 3, 5], np.int64)}
    idx[which][1] = bad
    with pytest.raises(ValueError, match=rf"{fn}: {which}\[1\] = {bad} is out of range.*\[0, 6\)"):
        getattr(_C, fn)(rewards, idx["pair_pos"], idx["pair_neg"])


@pytest.mark.parametrize("fn", ["pairwise_loss", "infonce_loss"])
def test_longlong_pair_indices_are_int64(fn):
    """np.longlong is int64 on Linux, a distinct dtype object from np.int64 (see test_packer)."""
    rewards, pos, neg = _groups(np.random.default_rng(5), 8, 4, positives=2)
    want = getattr(_C, fn)(rewards, pos, neg)
    got = getattr(_C, fn)(rewards, pos.astype(np.longlong), neg.astype(np.longlong))
    assert got[:2] == want[:2]
    np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.parametrize("fn", ["pairwise_loss", "infonce_loss"])
def test_input_checks(fn):
    f = getattr(_C, fn)
    r = np.zeros(4, np.float32)
    i = np.array([0, 1], np.int64)
    with pytest.raises(TypeError, match="rewards must have dtype float32"):
        f(r.astype(np.float64), i, i)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        f(r.reshape(2, 2), i, i)
    with pytest.raises(TypeError, match="pair_neg must have dtype int64"):
        f(r, i, i.astype(np.int32))
    with pytest.raises(ValueError, match="pair_pos must be contiguous"):
        f(r, np.arange(4, dtype=np.int64)[::2], i)
    with pytest.raises(ValueError, match="pair_pos has 2 entries but pair_neg has 1"):
        f(r, i, i[:1])
    with pytest.raises(TypeError, match="numpy array"):
        f([0.0, 1.0], i, i)
