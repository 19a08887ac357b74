"""The fused readout and losses on a CUDA GPU, Triton and CUDA (engine._C_cuda) implementations,
forward and backward, against float64 torch references on the same (rounded) inputs.

Error measure: max |got - ref| / max |ref| over each output. fp32 outputs must agree to ~1e-5; an
output stored in bf16 / fp16 (grad_hidden, a loss cast back to the rewards' dtype) carries that
dtype's rounding, so its bound is the dtype's: 1e-2 for bf16, 2e-3 for fp16. NaN or inf fails.
A missing engine._C_cuda fails the CUDA cases (run_all.sh builds it first); nothing is skipped.
"""
import pytest
import torch

from engine.loss import infonce_sums, pairwise_sums
from engine.model.readout import torch_reward_readout

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOW_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def impl(name):
    if name == "triton":
        from engine.kernels import contrastive_loss, reward_readout

        return reward_readout.reward_readout, contrastive_loss.pairwise_loss, contrastive_loss.infonce_loss
    from engine.kernels import cuda_ops  # ImportError names the build command

    return cuda_ops.reward_readout, cuda_ops.pairwise_loss, cuda_ops.infonce_loss


def rel_err(got, ref):
    got = got.detach().double()
    assert torch.isfinite(got).all(), "non-finite values in the kernel's output"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ---- readout ------------------------------------------------------------------------------------

READOUT_SHAPES = [  # (s, b, h, n, eps, scale): ragged n, b > 1, more rewards than rows (every row gathered again)
    (37, 1, 2048, 1, 1e-6, 1.0),
    (512, 2, 2048, 300, 1e-6, 1.0),
    (2048, 3, 4096, 1000, 1e-6, 1.0),
    (8192, 1, 4096, 4000, 1e-6, 1.0),
    (100, 2, 4096, 700, 1e-6, 1.0),
    (64, 1, 2056, 50, 1e-6, 1.0),  # h not a multiple of 16: the scalar path
    # mean(x^2) ~ 9 x scale^2 above, where eps = 1e-6 moves nothing at fp32: here eps is a tenth of it
    # or more (a large eps; activations of 1e-3), so a readout that left it out of rstd is off
    (300, 2, 2048, 200, 1.0, 1.0),
    (300, 2, 2048, 200, 1e-5, 1e-3),
]


@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s,b,h,n,eps,scale", READOUT_SHAPES)
def test_readout_forward_backward(name, dtype, s, b, h, n, eps, scale):
    readout = impl(name)[0]
    gen = torch.Generator(device="cuda").manual_seed(s * 31 + n)
    hidden = (torch.randn(s, b, h, device="cuda", generator=gen) * (3 * scale)).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(h, device="cuda", generator=gen)).to(dtype)
    head_w = (torch.randn(1, h, device="cuda", generator=gen) / h ** 0.5).to(dtype)
    # repeated indices always (n > s*b in one case): grad rows must receive the sum
    index = torch.randint(0, s * b, (n,), device="cuda", generator=gen)
    index[: n // 4] = index[n // 4: 2 * (n // 4)]
    grad_r = torch.randn(n, device="cuda", generator=gen, dtype=torch.float32)

    ins = [t.detach().clone().requires_grad_() for t in (hidden, norm_w, head_w)]
    got = readout(ins[0], index, ins[1], ins[2], eps)
    got.backward(grad_r)
    refs = [t.detach().double().requires_grad_() for t in (hidden, norm_w, head_w)]
    ref = torch_reward_readout(refs[0], index, refs[1], refs[2], eps)
    ref.backward(grad_r.double())

    assert got.dtype == torch.float32 and got.shape == (n,)
    assert rel_err(got, ref.detach()) < 2e-5
    for t, r, label in zip(ins, refs, ("hidden", "norm_weight", "head_weight")):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape, label
        err = rel_err(t.grad, r.grad)
        assert err < LOW_TOL[dtype], f"grad {label}: relative error {err:.2e}"
    # rows never gathered get exactly zero gradient
    untouched = torch.ones(s * b, dtype=torch.bool, device="cuda")
    untouched[index] = False
    flat = ins[0].grad.permute(1, 0, 2).reshape(s * b, h)
    assert (flat[untouched] == 0).all()


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_readout_noncontiguous_hidden_and_int32_index(name):
    readout = impl(name)[0]
    gen = torch.Generator(device="cuda").manual_seed(5)
    base = torch.randn(2, 300, 2048, device="cuda", generator=gen, dtype=torch.bfloat16)
    hidden = base.transpose(0, 1)  # [s, b, h] with b-major storage, as after a transpose
    w = torch.randn(2048, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, 2048, device="cuda", generator=gen, dtype=torch.bfloat16)
    index = torch.randint(0, 600, (123,), device="cuda", generator=gen, dtype=torch.int32)
    got = readout(hidden, index, w, v, 1e-6)
    ref = torch_reward_readout(hidden.double(), index.long(), w.double(), v.double(), 1e-6)
    assert rel_err(got, ref) < 2e-5


# ---- losses -------------------------------------------------------------------------------------

def ragged_groups(gen, num_groups, scale):
    """Groups of K in [2, 8] candidates, 1..K-1 positives, one pair per (positive, negative); shuffled."""
    ks = torch.randint(2, 9, (num_groups,), generator=gen)
    pos, neg, start = [], [], 0
    for k in ks.tolist():
        num_pos = int(torch.randint(1, k, (1,), generator=gen))
        perm = (torch.randperm(k, generator=gen) + start).tolist()
        for p in perm[:num_pos]:
            for q in perm[num_pos:]:
                pos.append(p)
                neg.append(q)
        start += k
    order = torch.randperm(len(pos), generator=gen)
    rewards = torch.randn(start, generator=gen, dtype=torch.float64) * scale
    return (rewards.cuda(), torch.tensor(pos)[order].cuda(), torch.tensor(neg)[order].cuda())


@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["pairwise", "infonce"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_groups,scale", [(1, 1.0), (37, 3.0), (700, 1.0), (3000, 1e4), (200, 1e-3)])
def test_loss_forward_backward(name, kind, dtype, num_groups, scale):
    _, pairwise, infonce = impl(name)
    if dtype == torch.float16 and scale > 100:
        # the loss sum is returned in the rewards' dtype: fp16 overflows (65504) at this magnitude
        num_groups, scale = 30, 50.0
    gen = torch.Generator().manual_seed(num_groups + int(scale))
    rewards, pos, neg = ragged_groups(gen, num_groups, scale)
    rewards = rewards.to(dtype).double()  # the reference sees exactly the kernel's inputs
    fn, ref_fn = (pairwise, pairwise_sums) if kind == "pairwise" else (infonce, infonce_sums)

    r = rewards.to(dtype).requires_grad_()
    got = fn(r, pos, neg)
    got[0].backward()
    rr = rewards.clone().requires_grad_()
    ref = ref_fn(rr, pos, neg)
    ref[0].backward()

    assert len(got) == len(ref)
    assert got[0].dtype == dtype and r.grad.dtype == dtype
    assert rel_err(got[0], ref[0].detach()) < LOW_TOL[dtype], "loss sum"
    for g, e in zip(got[1:], ref[1:]):  # counts are exact
        assert g.item() == e.to(g.dtype).item()
    assert rel_err(r.grad, rr.grad) < LOW_TOL[dtype], "d loss / d rewards"


@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["pairwise", "infonce"])
def test_loss_no_pairs(name, kind):
    fn = impl(name)[1 if kind == "pairwise" else 2]
    r = torch.randn(5, device="cuda").requires_grad_()
    empty = torch.zeros(0, dtype=torch.long, device="cuda")
    out = fn(r, empty, empty)
    out[0].backward()
    assert all(o.item() == 0 for o in out) and (r.grad == 0).all()


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_out_of_range_indices_poison_without_touching_memory(name):
    """Neither implementation reads or writes outside its inputs for a bad index (no host check: it
    would sync every step). Readout: that reward is NaN, the others and the gradients are those of
    the good indices alone. Losses: the loss sum is NaN, the counts and gradients those of the
    good pairs alone."""
    readout, pairwise, infonce = impl(name)
    gen = torch.Generator(device="cuda").manual_seed(5)
    s, b, h = 64, 2, 512
    hidden = torch.randn(s, b, h, device="cuda", generator=gen)
    norm_w, head_w = 1 + 0.1 * torch.randn(h, device="cuda", generator=gen), torch.randn(1, h, device="cuda")
    index = torch.tensor([3, s * b, 0, -1, 77, 10**12], device="cuda")
    bad = torch.tensor([False, True, False, True, False, True], device="cuda")
    x = hidden.clone().requires_grad_()
    got = readout(x, index, norm_w, head_w, 1e-6)
    assert torch.isnan(got[bad]).all()
    got[~bad].sum().backward()
    ref_x = hidden.double().requires_grad_()
    ref = torch_reward_readout(ref_x, index[~bad], norm_w.double(), head_w.double(), 1e-6)
    ref.sum().backward()
    assert rel_err(got[~bad], ref) < 2e-5 and rel_err(x.grad, ref_x.grad) < 2e-5
    r = torch.randn(8, device="cuda", dtype=torch.float64)
    pos, neg = torch.tensor([0, 0, 1], device="cuda"), torch.tensor([2, 3, 4], device="cuda")
    for fn, reference in ((pairwise, pairwise_sums), (infonce, infonce_sums)):
        ref_r = r.clone().requires_grad_()
        ref_out = reference(ref_r, pos, neg)
        ref_out[0].backward()
        for bp, bq in ((8, 0), (0, -1), (-3, 10**9)):
            rk = r.float().requires_grad_()
            out = fn(rk, torch.cat([pos, torch.tensor([bp], device="cuda")]),
                     torch.cat([neg, torch.tensor([bq], device="cuda")]))
            out[0].backward()
            assert torch.isnan(out[0]), (fn, bp, bq)
            assert out[1].item() == ref_out[1].item(), (fn, bp, bq)  # correct pairs / positives
            assert rel_err(rk.grad, ref_r.grad) < 2e-5, (fn, bp, bq)


def test_cuda_ops_pass_opcheck():
    from torch.library import opcheck

    from engine.kernels import cuda_ops  # noqa: F401

    hidden = torch.randn(16, 2, 256, device="cuda", requires_grad=True)
    w, v = torch.randn(256, device="cuda"), torch.randn(1, 256, device="cuda")
    index = torch.tensor([0, 5, 5, 31], device="cuda")
    opcheck(torch.ops.polar.reward_readout_cuda_fwd.default, (hidden, index, w, v, 1e-6))
    r = torch.randn(6, device="cuda", requires_grad=True)
    p, q = torch.tensor([0, 0, 3], device="cuda"), torch.tensor([1, 2, 4], device="cuda")
    opcheck(torch.ops.polar.pairwise_loss_cuda.default, (r, p, q))
    opcheck(torch.ops.polar.infonce_loss_cuda.default, (r, p, q))


@pytest.mark.parametrize("name", ["triton", "cuda"])
@pytest.mark.parametrize("rewards", [[0.0, -float("inf"), 0.5], [0.0, 0.5, -float("inf")]])
def test_infonce_infinite_margin_in_either_order(name, rewards):
    """A negative at -inf adds nothing to its positive's softmax but still leaves it a positive; the
    CUDA kernel merges margins in an order atomics choose, so both orders must give the reference."""
    infonce = impl(name)[2]
    r = torch.tensor(rewards, device="cuda", requires_grad=True)
    pos, neg = torch.tensor([0, 0], device="cuda"), torch.tensor([1, 2], device="cuda")
    out = infonce(r, pos, neg)
    out[0].backward()
    ref_r = torch.tensor(rewards, device="cuda", dtype=torch.float64, requires_grad=True)
    ref = infonce_sums(ref_r, pos, neg)
    ref[0].backward()
    assert torch.isfinite(out[0]) and out[1].item() == ref[1].item() == 1
    assert rel_err(out[0], ref[0].detach()) < 2e-5 and torch.isfinite(r.grad).all()
    assert rel_err(r.grad, ref_r.grad) < 2e-5


def test_cuda_readout_refuses_h0_and_bad_eps():
    """h = 0 divided by zero on the host in the backward's grid setup (SIGFPE, no Python error)."""
    from engine.kernels import cuda_ops  # noqa: F401

    idx = torch.tensor([0, 1], device="cuda")
    w0, w = torch.ones(0, device="cuda"), torch.ones(8, device="cuda")
    with pytest.raises(RuntimeError, match="hidden has h = 0"):
        torch.ops.polar.reward_readout_cuda_bwd(torch.ones(2, device="cuda"), torch.ones(4, 2, 0, device="cuda"),
                                                idx, w0, w0, 1e-6)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="eps must be a finite number >= 0"):
            torch.ops.polar.reward_readout_cuda_fwd(torch.ones(4, 2, 8, device="cuda"), idx, w, w, eps)
