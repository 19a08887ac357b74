"""polar::pairwise_loss and polar::infonce_loss (Triton) against the float64 torch references, in the
Triton interpreter (see test_reward_readout.py for the TRITON_INTERPRET and compile-check notes)."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.kernels import contrastive_loss as cl  # noqa: E402
from engine.loss import infonce_sums, pairwise_sums  # noqa: E402
from tests.engine.test_loss import check_separated_infonce  # noqa: E402
from tests.engine.kernels.test_reward_readout import run_compile_check  # noqa: E402

KERNELS = {"pairwise": (cl.pairwise_loss, pairwise_sums), "infonce": (cl.infonce_loss, infonce_sums)}


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels are meant to write in full starts as NaN."""
    monkeypatch.setattr(cl, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"), device=device,
                                                                               dtype=dtype))


def ragged_groups(gen, num_groups, scale=1.0, ties=False):
    """Groups of K in [2, 16] candidates, 1..K-1 of them positive; a pair per (positive, negative) of a group."""
    pos, neg, start = [], [], 0
    for _ in range(num_groups):
        k = int(torch.randint(2, 17, (1,), generator=gen))
        num_pos = int(torch.randint(1, k, (1,), generator=gen))
        perm = torch.randperm(k, generator=gen) + start
        for p in perm[:num_pos]:
            for q in perm[num_pos:]:
                pos.append(int(p))
                neg.append(int(q))
        start += k
    rewards = torch.randn(start, generator=gen, dtype=torch.float64) * scale
    if ties:
        rewards = rewards.round()  # many equal rewards: margin == 0 pairs
    return rewards, torch.tensor(pos, dtype=torch.long), torch.tensor(neg, dtype=torch.long)


def _run(fn, rewards, pos, neg, dtype):
    r = rewards.detach().to(dtype).requires_grad_()
    out = fn(r, pos, neg)
    out[0].backward()
    return [o.detach() for o in out] + [r.grad]


@pytest.mark.parametrize("kind", ["pairwise", "infonce"])
@pytest.mark.parametrize("num_groups,scale,ties", [(1, 1.0, False), (3, 1.0, True), (17, 3.0, False),
                                                   (40, 1.0, True), (25, 1e4, False), (8, 1e-3, False)])
def test_fp32_matches_float64_reference(kind, num_groups, scale, ties):
    gen = torch.Generator().manual_seed(num_groups * 7 + int(ties))
    rewards, pos, neg = ragged_groups(gen, num_groups, scale, ties)
    rewards = rewards.float().double()  # the reference sees exactly the kernel's inputs
    kernel, reference = KERNELS[kind]
    ref = _run(reference, rewards, pos, neg, torch.float64)
    got = _run(kernel, rewards, pos, neg, torch.float32)
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape, i
        assert torch.isfinite(g).all(), i
        tol = 1e-5 * (r.abs().max().item() + 1)
        assert (g.double() - r).abs().max().item() <= tol, (i, g, r)
    if kind == "pairwise":
        assert got[1].dtype == torch.float32 and got[1] == ref[1]  # correct count exact, ties count 1/2


def test_pairwise_loss_of_well_separated_pairs_keeps_its_relative_precision():
    """softplus(-m) = log1p(e^-m) for margins 8..60 (loss 3e-4 down to 9e-27): log(1 + e^-m) in fp32
    lost e^-m's low bits (2e-5 relative error at m = 8) and all of it past m = 16.6 (loss 0). The
    kernel's error is held to torch's own fp32 softplus error bound, relative to the float64 loss."""
    for m in (8.0, 12.5, 16.0, 17.0, 20.0, 33.0, 60.0):
        rewards = torch.tensor([m, 0.0])
        pos, neg = torch.tensor([0]), torch.tensor([1])
        ref = pairwise_sums(rewards.double(), pos, neg)[0].item()
        for loss in (cl.pairwise_loss(rewards, pos, neg)[0].item(), pairwise_sums(rewards, pos, neg)[0].item()):
            assert abs(loss - ref) <= 1e-6 * ref, (m, loss, ref)


def test_infonce_of_well_separated_groups_keeps_its_relative_precision():
    """Largest margins -100..100 against the fp64 oracle, to the fp32 bound of tests/engine/test_loss.py:
    the kernel took log(S + 1) where M = 0, so a group's loss lost S's low bits (9e-4 relative error
    at M = -10) and was 0 below M = -16.6 (true 6e-8 down to 5e-44)."""
    check_separated_infonce(lambda rewards, pos, neg: _run(cl.infonce_loss, rewards, pos, neg, torch.float32))


@pytest.mark.parametrize("kind", ["pairwise", "infonce"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(kind, dtype):
    """STYLE 8: error against the float64 reference at most twice torch's own error in the same dtype."""
    gen = torch.Generator().manual_seed(11)
    rewards, pos, neg = ragged_groups(gen, 30, scale=2.0)
    kernel, reference = KERNELS[kind]
    ref = _run(reference, rewards, pos, neg, torch.float64)
    torch_low = _run(reference, rewards, pos, neg, dtype)
    got = _run(kernel, rewards, pos, neg, dtype)
    assert [g.dtype for g in got] == [t.dtype for t in torch_low]
    for i, (g, t, r) in enumerate(zip(got, torch_low, ref)):
        e_k = (g.double() - r).abs().max().item()
        e_t = (t.double() - r).abs().max().item()
        assert e_k <= 2 * e_t + 1e-5 * (r.abs().max().item() + 1), (i, e_k, e_t)


def test_many_pairs_span_blocks_and_repeat_rewards():
    """More pairs than one block, every reward in many pairs (atomic accumulation of the gradient)."""
    gen = torch.Generator().manual_seed(2)
    n, num_pairs = 50, 3 * cl.BLOCK_P + 17
    rewards = torch.randn(n, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, n, (num_pairs,), generator=gen)
    neg = torch.randint(0, n, (num_pairs,), generator=gen)
    for kernel, reference in KERNELS.values():
        ref = _run(reference, rewards, pos, neg, torch.float64)
        got = _run(kernel, rewards, pos, neg, torch.float32)
        for g, r in zip(got, ref):
            assert (g.double() - r).abs().max().item() <= 2e-5 * (r.abs().max().item() + 1)


@pytest.mark.parametrize("op", [cl.pairwise_loss, cl.infonce_loss])
def test_integer_rewards_and_float_indices_are_refused_by_name(op):
    """The kernels read any dtype: integer rewards came back as a truncated loss, float indices as
    a Triton type error naming neither argument."""
    pos, neg = torch.tensor([0, 1]), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="rewards must be a floating-point tensor, got torch.int64"):
        op(torch.tensor([3, 0, 1]), pos, neg)
    with pytest.raises(TypeError, match="pair_neg must be int32 or int64 indices"):
        op(torch.tensor([3.0, 0.0, 1.0]), pos, neg.float())


def test_no_pairs():
    rewards = torch.randn(4, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    loss, correct, pairs = cl.pairwise_loss(rewards, empty, empty)
    assert loss.item() == 0 and correct.item() == 0 and pairs.item() == 0
    loss_i, count = cl.infonce_loss(rewards, empty, empty)
    assert loss_i.item() == 0 and count.item() == 0
    (loss + loss_i).backward()
    assert (rewards.grad == 0).all()


def test_backward_scales_with_upstream_gradient():
    gen = torch.Generator().manual_seed(9)
    rewards, pos, neg = ragged_groups(gen, 5)
    for kernel, reference in KERNELS.values():
        r_k = rewards.float().requires_grad_()
        r_r = rewards.clone().requires_grad_()
        (kernel(r_k, pos, neg)[0] * -2.5).backward()
        (reference(r_r, pos, neg)[0] * -2.5).backward()
        assert (r_k.grad.double() - r_r.grad).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["pairwise", "infonce"])
def test_out_of_range_pair_poisons_the_loss_sum_only(kind):
    """Pairs indexing outside the rewards are never read or written (a host check would sync every
    step): the loss sum is NaN; the count and gradient are those of the in-range pairs alone."""
    gen = torch.Generator().manual_seed(13)
    rewards, pos, neg = ragged_groups(gen, 4)
    n = rewards.numel()
    kernel, reference = KERNELS[kind]
    ref = _run(reference, rewards, pos, neg, torch.float64)
    for bad_pos, bad_neg in ((n, 0), (0, -1), (-5, n + 7)):
        got = _run(kernel, rewards, torch.cat([pos, torch.tensor([bad_pos])]),
                   torch.cat([neg, torch.tensor([bad_neg])]), torch.float32)
        assert torch.isnan(got[0]), (bad_pos, bad_neg)
        # pairwise returns the pair count (all pairs, one more than the reference); the rest must match
        rest_got, rest_ref = (got[1:2] + got[3:], ref[1:2] + ref[3:]) if kind == "pairwise" else (got[1:], ref[1:])
        for g, r in zip(rest_got, rest_ref):
            assert torch.isfinite(g).all()
            assert (g.double() - r).abs().max().item() <= 2e-5 * (r.abs().max().item() + 1)


@pytest.mark.parametrize("kind", ["pairwise", "infonce"])
def test_pairs_into_no_rewards_poison_the_loss_sum(kind):
    """n = 0 with a pair: every pair is out of range, so the loss sum is NaN as above (InfoNCE had no
    partial-sum block for n = 0 and raised IndexError instead)."""
    rewards = torch.zeros(0, requires_grad=True)
    out = KERNELS[kind][0](rewards, torch.tensor([0]), torch.tensor([0]))
    assert torch.isnan(out[0]) and out[1].item() == 0
    out[0].backward()
    assert rewards.grad.shape == (0,)


@pytest.mark.parametrize("op", ["pairwise_loss", "infonce_loss"])
def test_opcheck(op):
    gen = torch.Generator().manual_seed(4)
    rewards, pos, neg = ragged_groups(gen, 3)
    torch.library.opcheck(getattr(torch.ops.polar, op).default, (rewards.float().requires_grad_(), pos, neg))


def test_compiles_for_sm90():
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}
    specs = []
    consts = {"BLOCK": cl.BLOCK_P}
    for p in ptr.values():
        pairs = dict(rewards_ptr=p, pos_ptr="*i64", neg_ptr="*i64")
        specs += [
            ("_pairwise_kernel", dict(pairs, grad_ptr="*fp32", partial_ptr="*fp32", num_pairs="i32", n="i32",
                                      nan="fp32", BLOCK="constexpr"), consts, 4),
            ("_infonce_max_kernel", dict(pairs, max_ptr="*fp32", num_pairs="i32", n="i32", BLOCK="constexpr"),
             consts, 4),
            ("_infonce_sum_kernel", dict(pairs, max_ptr="*fp32", sum_ptr="*fp32", num_pairs="i32", n="i32",
                                         BLOCK="constexpr"), consts, 4),
            ("_infonce_grad_kernel", dict(pairs, max_ptr="*fp32", sum_ptr="*fp32", grad_ptr="*fp32", num_pairs="i32",
                                          n="i32", BLOCK="constexpr"), consts, 4),
        ]
    specs += [
        ("_infonce_loss_kernel", dict(max_ptr="*fp32", sum_ptr="*fp32", count_ptr="*fp32", partial_ptr="*fp32",
                                      n="i32", BLOCK="constexpr"), consts, 4),
        ("_count_kernel", dict(pos_ptr="*i64", neg_ptr="*i64", count_ptr="*fp32", bad_ptr="*fp32", num_pairs="i32",
                               n="i32", BLOCK="constexpr"), consts, 4),
    ]
    run_compile_check("engine.kernels.contrastive_loss", specs)
