"""polar::reward_readout (Triton) against the float64 torch reference, run in the Triton interpreter.

TRITON_INTERPRET must be set before the kernel module is imported (kernels are decorated then); the
kernels avoid triton.language.standard jit helpers, so an earlier `import triton` does not matter.
The real compiler check runs in a subprocess without the interpreter (the two modes cannot share a
process) and compiles every kernel for sm_90.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from engine.kernels import reward_readout as rr  # noqa: E402
from engine.loss import pairwise_sums  # noqa: E402
from engine.model.readout import torch_reward_readout  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
EPS = 1e-6


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels are meant to write in full starts as NaN."""
    monkeypatch.setattr(rr, "_empty", lambda shape, device, dtype: torch.full(shape, float("nan"), device=device,
                                                                               dtype=dtype))


def _case(gen, n, h, s=None, b=None):
    s = s or int(torch.randint(1, 40, (1,), generator=gen))
    b = b or int(torch.randint(1, 4, (1,), generator=gen))
    hidden = torch.randn(s, b, h, generator=gen, dtype=torch.float64) * 3
    # sampled with replacement: repeated indices whenever n is large against s*b
    index = torch.randint(0, s * b, (n,), generator=gen)
    norm_w = 1 + 0.3 * torch.randn(h, generator=gen, dtype=torch.float64)
    head_w = torch.randn(1, h, generator=gen, dtype=torch.float64) / h ** 0.5
    grad_out = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, index, norm_w, head_w, grad_out


def _run(fn, hidden, index, norm_w, head_w, grad_out, dtype, eps=EPS):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, norm_w, head_w)]
    out = fn(leaves[0], index, leaves[1], leaves[2], eps)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _max_err(xs, ys):
    return [(x.double() - y.double()).abs().max().item() for x, y in zip(xs, ys)]


CASES = [(n, h) for h in (64, 128, 192) for n in (1, 2, 37, 129, 300)]


@pytest.mark.parametrize("n,h", CASES)
def test_fp32_matches_float64_reference(n, h):
    gen = torch.Generator().manual_seed(1000 * n + h)
    case = _case(gen, n, h)
    ref = _run(torch_reward_readout, *case, torch.float64)
    got = _run(rr.reward_readout, *case, torch.float32)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, g, r in zip(("rewards", "hidden", "norm", "head"), got, ref):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        scale = r.abs().max().item() + 1
        assert (g.double() - r).abs().max().item() <= 2e-5 * scale, name


@pytest.mark.parametrize("eps,scale", [(1.0, 1.0), (1e-5, 1e-3)])
def test_eps_as_large_as_the_mean_square(eps, scale):
    """The cases above have mean(x^2) ~ 9 against eps = 1e-6, where eps moves nothing at fp32: here
    it is a tenth of mean(x^2) or more (a large eps; activations of 1e-3, as a trained model's
    final hidden state may have), so a readout that left it out of rstd, forward or backward, is off."""
    gen = torch.Generator().manual_seed(17)
    hidden, *rest = _case(gen, 37, 128)
    case = (hidden * scale, *rest)
    ref = _run(torch_reward_readout, *case, torch.float64, eps)
    got = _run(rr.reward_readout, *case, torch.float32, eps)
    for name, g, r in zip(("rewards", "hidden", "norm", "head"), got, ref):
        assert (g.double() - r).abs().max().item() <= 2e-5 * r.abs().max().item(), name


def test_zero_eps_leaves_the_unused_rows_of_a_tile_out_of_the_weight_gradients():
    """eps = 0 is a valid RMSNorm (the op accepts eps >= 0): the rows a tile holds past n are zeros,
    whose 1/sqrt(0) must not reach the summed norm and head gradients as 0 * inf."""
    gen = torch.Generator().manual_seed(3)
    hidden, index, norm_w, head_w, grad_out = _case(gen, 3, 64)
    leaves = [[t.detach().to(dt).requires_grad_() for t in (hidden, norm_w, head_w)]
              for dt in (torch.float32, torch.float64)]
    for fn, (x, w, v) in zip((rr.reward_readout, torch_reward_readout), leaves):
        out = fn(x, index, w, v, 0.0)
        out.backward(grad_out.to(out.dtype))
    for name, got, ref in zip(("hidden", "norm", "head"), *leaves):
        assert torch.isfinite(got.grad).all(), name
        assert (got.grad.double() - ref.grad).abs().max().item() <= 2e-5 * (ref.grad.abs().max().item() + 1), name


def test_repeated_index_accumulates():
    gen = torch.Generator().manual_seed(7)
    hidden, _, norm_w, head_w, _ = _case(gen, 1, 128, s=5, b=2)
    index = torch.tensor([3, 3, 3, 8, 0, 8])
    grad_out = torch.randn(6, generator=gen, dtype=torch.float64)
    ref = _run(torch_reward_readout, hidden, index, norm_w, head_w, grad_out, torch.float64)
    got = _run(rr.reward_readout, hidden, index, norm_w, head_w, grad_out, torch.float32)
    untouched = torch.ones(5 * 2, dtype=torch.bool)
    untouched[index] = False
    assert (got[1].permute(1, 0, 2).reshape(10, 128)[untouched] == 0).all()
    for g, r in zip(got, ref):
        assert (g.double() - r).abs().max().item() <= 2e-5 * (r.abs().max().item() + 1)


class _Created(TorchDispatchMode):
    """Every tensor the torch ops under it return, as (op, shape, dtype)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made.append((str(func), tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_creates_no_fp32_tensor_of_the_hidden_shape(dtype):
    """grad_hidden is written once in hidden's dtype; the only fp32 buffer with h columns has the
    n readout rows (an fp32 [s, b, h] buffer cast at the end moved ~5x grad_hidden's bytes). Rows
    read three times and out-of-range indices included; the gradients still equal the reference."""
    gen = torch.Generator().manual_seed(23)
    s, b, h = 12, 3, 64
    hidden, _, norm_w, head_w, _ = _case(gen, 1, h, s=s, b=b)
    index = torch.tensor([5, 5, 30, 5, 0, 35, -1, 10**6, 30])
    grad_out = torch.randn(index.numel(), generator=gen, dtype=torch.float64)
    x = hidden.to(dtype)
    with _Created() as mode:
        grad_hidden, _, _ = rr.reward_readout_bwd(grad_out.float(), x, index, norm_w.to(dtype), head_w.to(dtype), EPS)
    assert grad_hidden.dtype == dtype and grad_hidden.shape == (s, b, h)
    big = [m for m in mode.made if m[2] == torch.float32 and len(m[1]) >= 2 and m[1][-1] == h
           and torch.Size(m[1]).numel() > index.numel() * h]
    assert not big, big
    assert any(m[1] == (index.numel(), h) and m[2] == torch.float32 for m in mode.made), mode.made
    ok = (index >= 0) & (index < s * b)
    ref = _run(torch_reward_readout, x.double(), index[ok], norm_w.to(dtype).double(), head_w.to(dtype).double(),
               grad_out[ok], torch.float64)[1]
    # one rounding to dtype of the fp32 sum: within half a unit in the last place of the reference
    assert (grad_hidden.double() - ref).abs().max().item() <= 2 ** -8 * (ref.abs().max().item() + 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h", [(5, 64), (200, 192), (64, 128)])
def test_low_precision_within_twice_torch_error(dtype, n, h):
    """STYLE 8: error against the float64 reference at most twice torch's own error in the same dtype."""
    gen = torch.Generator().manual_seed(31 * n + h)
    case = _case(gen, n, h)
    ref = _run(torch_reward_readout, *case, torch.float64)
    torch_low = _run(torch_reward_readout, *case, dtype)
    got = _run(rr.reward_readout, *case, dtype)
    assert got[0].dtype == torch.float32
    assert [g.dtype for g in got[1:]] == [dtype] * 3
    for name, e_k, e_t, r in zip(("rewards", "hidden", "norm", "head"), _max_err(got, ref),
                                 _max_err(torch_low, ref), ref):
        assert e_k <= 2 * e_t + 1e-5 * (r.abs().max().item() + 1), (name, e_k, e_t)


def test_non_contiguous_hidden_and_empty_index():
    gen = torch.Generator().manual_seed(3)
    hidden, index, norm_w, head_w, grad_out = _case(gen, 20, 64, s=6, b=3)
    # [b, s, h] storage viewed as [s, b, h]: the kernel reads through strides
    hidden_nc = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    assert not hidden_nc.is_contiguous()
    ref = torch_reward_readout(hidden, index, norm_w, head_w, EPS)
    got = rr.reward_readout(hidden_nc.float(), index, norm_w.float(), head_w.float(), EPS)
    assert (got.double() - ref).abs().max().item() <= 2e-5 * (ref.abs().max().item() + 1)
    empty = rr.reward_readout(hidden.float(), index[:0], norm_w.float(), head_w.float(), EPS)
    assert empty.shape == (0,)


def test_out_of_range_index_gives_nan_reward_and_no_gradient():
    """Out-of-range indices are never read or written (a host check would sync every step): their
    reward is NaN, the other rewards and every gradient are what the in-range indices alone give."""
    gen = torch.Generator().manual_seed(11)
    hidden, _, norm_w, head_w, _ = _case(gen, 1, 64, s=5, b=2)
    index = torch.tensor([3, 10, 0, -1, 9, 10**9, 3])
    bad = torch.tensor([False, True, False, True, False, True, False])
    grad_out = torch.randn(7, generator=gen, dtype=torch.float64)
    got = _run(rr.reward_readout, hidden, index, norm_w, head_w, grad_out, torch.float32)
    assert torch.isnan(got[0][bad]).all() and torch.isfinite(got[0][~bad]).all()
    ref = _run(torch_reward_readout, hidden, index[~bad], norm_w, head_w, grad_out[~bad], torch.float64)
    assert (got[0][~bad].double() - ref[0]).abs().max().item() <= 2e-5 * (ref[0].abs().max().item() + 1)
    for g, r in zip(got[1:], ref[1:]):
        assert torch.isfinite(g).all()
        assert (g.double() - r).abs().max().item() <= 2e-5 * (r.abs().max().item() + 1)


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    hidden, index, norm_w, head_w, _ = _case(gen, 9, 64, s=4, b=2)
    args = (hidden.float().requires_grad_(), index, norm_w.float().requires_grad_(),
            head_w.float().requires_grad_(), EPS)
    torch.library.opcheck(torch.ops.polar.reward_readout.default, args)


# sm_90 compile check ------------------------------------------------------------------------------

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_INTS = ["n", "s", "num_rows", "h", "stride_s", "stride_b", "stride_h"]


def compile_specs():
    specs = []
    for dtype, ptr in _PTR.items():
        for block_h in (256, 4096):
            consts = {"BLOCK_N": rr._block_n(block_h), "BLOCK_H": block_h}
            fwd = dict(hidden_ptr=ptr, index_ptr="*i64", norm_w_ptr=ptr, head_w_ptr=ptr, out_ptr="*fp32",
                       **{k: "i32" for k in _INTS}, eps="fp32", nan="fp32", BLOCK_N="constexpr",
                       BLOCK_H="constexpr")
            bwd = dict(hidden_ptr=ptr, index_ptr="*i64", norm_w_ptr=ptr, head_w_ptr=ptr, grad_out_ptr="*fp32",
                       row_grad_ptr="*fp32", dw_partial_ptr="*fp32", dv_partial_ptr="*fp32",
                       **{k: "i32" for k in _INTS}, eps="fp32", BLOCK_N="constexpr", BLOCK_H="constexpr")
            rows = dict(row_grad_ptr="*fp32", order_ptr="*i64", lo_ptr="*i64", hi_ptr="*i64", grad_hidden_ptr=ptr,
                        s="i32", h="i32", gstride_s="i32", gstride_b="i32", BLOCK_H="constexpr")
            specs.append(("_readout_fwd_kernel", fwd, consts, rr._num_warps(block_h)))
            specs.append(("_readout_bwd_kernel", bwd, consts, rr._num_warps(block_h)))
            specs.append(("_readout_rows_kernel", rows, {"BLOCK_H": block_h}, rr._num_warps(block_h)))
    return specs


COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
module, specs = json.loads(sys.argv[1])
mod = importlib.import_module(module)
for name, sig, consts, warps in specs:
    kernel = getattr(mod, name)
    assert isinstance(kernel, triton.runtime.JITFunction), type(kernel)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert "cubin" in compiled.asm and "ptx" in compiled.asm, name
print("compiled", len(specs))
"""


def run_compile_check(module, specs):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps([module, specs])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"compiled {len(specs)}" in proc.stdout


def test_compiles_for_sm90():
    run_compile_check("engine.kernels.reward_readout", compile_specs())


def test_compile_check_fails_on_compile_errors():
    """The check is not vacuous: a signature the kernel cannot compile with makes it fail."""
    name, sig, consts, warps = compile_specs()[0]
    with pytest.raises(AssertionError):
        run_compile_check("engine.kernels.reward_readout", [(name, sig, dict(consts, BLOCK_H=100), warps)])


def test_torch_compile_fullgraph_with_the_loss():
    from engine.kernels.contrastive_loss import pairwise_loss

    def step(hidden, index, norm_w, head_w, pos, neg):
        return pairwise_loss(rr.reward_readout(hidden, index, norm_w, head_w, EPS), pos, neg)[0]

    gen = torch.Generator().manual_seed(8)
    hidden, index, norm_w, head_w, _ = _case(gen, 6, 64, s=5, b=2)
    pos, neg = torch.tensor([0, 0, 3, 4]), torch.tensor([1, 2, 5, 5])
    leaves = [t.float().requires_grad_() for t in (hidden, norm_w, head_w)]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(leaves[0], index, leaves[1], leaves[2], pos, neg)
    out.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, norm_w, head_w)]
    ref = pairwise_sums(torch_reward_readout(ref_leaves[0], index, ref_leaves[1], ref_leaves[2], EPS), pos, neg)[0]
    ref.backward()
    assert abs(out.item() - ref.item()) <= 1e-5 * (abs(ref.item()) + 1)
    for g, r in zip(leaves, ref_leaves):
        assert (g.grad.double() - r.grad).abs().max().item() <= 1e-5 * (r.grad.abs().max().item() + 1)
