"""FP8 linear products (engine/model/fp8_linear.py): the recipe against torchao's float8 training,
the error against full precision, token padding, saturation, and the layer-spec swap."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

from engine.model import fp8_linear as fl

RECIPES = ("tensorwise", "rowwise")


def _run(recipe, x, w, g, bias=None):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = fl.fp8_linear(x, w, b, recipe)
    y.backward(g)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def _data(m=37, k=64, n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.05
    g = torch.randn(2, m, n, generator=gen)
    return x, w, g


def _torchao_config(recipe):
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.config import CastConfig, ScalingGranularity

    if recipe == "tensorwise":
        return Float8LinearConfig.from_recipe_name("tensorwise")
    # torchao's own "rowwise" recipe casts gradients to e4m3; ours keeps e5m2 for them, so the
    # reference is its axiswise recipe with an e5m2 gradient cast (power-of-two scales as in both)
    axis = ScalingGranularity.AXISWISE
    return Float8LinearConfig(
        cast_config_input=CastConfig(scaling_granularity=axis),
        cast_config_weight=CastConfig(scaling_granularity=axis),
        cast_config_grad_output=CastConfig(scaling_granularity=axis, target_dtype=torch.float8_e5m2),
        round_scales_to_power_of_2=True,
    )


@pytest.mark.parametrize("recipe", RECIPES)
def test_matches_torchao_float8_training(recipe):
    """torchao is the reference recipe. Per tensor: bit-identical gradients, and the forward to the
    summation order of the CPU kernel only (our CPU product of two e4m3 operands takes row / column
    scales where torchao's takes scalars: test_cpu_tensorwise_product_takes_row_and_column_scales'
    tolerance). Per row: torchao requests bf16 results from the row-scaled product (what CUDA
    supports) and we keep the training dtype on CPU, so they agree to bf16 rounding (2^-8 relative)
    and no further."""
    pytest.importorskip("torchao.float8")
    from torchao.float8 import convert_to_float8_training

    m, k, n = 32, 64, 48  # torchao pads nothing: keep its products aligned
    x, w, g = _data(m, k, n)
    ref = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        ref.weight.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = convert_to_float8_training(copy.deepcopy(ref), config=_torchao_config(recipe))
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(g)
    y, dx, dw, _ = _run(recipe, x, w, g)
    pairs = [(y, yr.detach()), (dx, xr.grad), (dw, ref.weight.grad)]
    for i, (got, want) in enumerate(pairs):
        if recipe == "tensorwise" and i == 0:
            torch.testing.assert_close(got, want, rtol=0.0, atol=2 ** -20 * want.abs().max().item())
        elif recipe == "tensorwise":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=2 ** -8, atol=2 ** -8 * want.abs().max().item())


@pytest.mark.parametrize("recipe", RECIPES)
def test_close_to_full_precision(recipe):
    """e4m3 keeps 3 mantissa bits (relative rounding error <= 2^-4 per element), e5m2 2 bits
    (<= 2^-3): over sums of many products the relative Frobenius error of each result stays
    well under 0.1, and far from 0 (the products really run in FP8)."""
    x, w, g = _data()
    y, dx, dw, _ = _run(recipe, x, w, g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = xr @ wr.t()
    yr.backward(g)
    for got, want in [(y, yr), (dx, xr.grad), (dw, wr.grad)]:
        rel = ((got - want).norm() / want.norm()).item()
        assert 1e-3 < rel < 0.1, rel


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("m,n", [(1, 48), (37, 1), (1, 1)], ids=["one_token", "one_output", "both"])
def test_a_single_token_or_output_feature(recipe, m, n):
    """Row-wise scales of one row are still row scales ([1, 1] beside [1, N]): the product must
    not mistake them for a per-tensor scalar. Forward and both gradients near full precision."""
    gen = torch.Generator().manual_seed(1)
    x, w, g = torch.randn(1, m, 64, generator=gen), torch.randn(n, 64, generator=gen) * 0.05, \
        torch.randn(1, m, n, generator=gen)
    y, dx, dw, _ = _run(recipe, x, w, g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = xr @ wr.t()
    yr.backward(g)
    for got, want in [(y, yr), (dx, xr.grad), (dw, wr.grad)]:
        assert got.shape == want.shape
        assert ((got - want).norm() / want.norm()).item() < 0.15


def test_bias_is_added_in_full_precision():
    x, w, g = _data()
    bias = torch.randn(w.shape[0])
    y, _, _, db = _run("tensorwise", x, w, g, bias)
    y0, _, _, _ = _run("tensorwise", x, w, g)
    torch.testing.assert_close(y, y0 + bias)
    torch.testing.assert_close(db, g.sum((0, 1)))


@pytest.mark.parametrize("recipe", RECIPES)
def test_token_padding_enters_neither_the_scales_nor_the_result(recipe, monkeypatch):
    """74 tokens: the weight-gradient product contracts over tokens and is padded to 80 for CUDA's
    alignment rule. CPU _scaled_mm also runs unpadded: both give the same bits."""
    shapes = []
    real = torch._scaled_mm

    def spy(a, b, *args, **kwargs):
        shapes.append((tuple(a.shape), tuple(b.shape), b.stride()))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    x, w, g = _data(m=37)
    padded = _run(recipe, x, w, g)
    assert ((48, 80), (80, 64)) in [s[:2] for s in shapes], shapes  # dW = dy^T [N, M] @ x [M, K]
    for a_shape, b_shape, b_stride in shapes:
        assert b_stride[0] == 1, "second operand must be column-major"
        assert a_shape[1] == b_shape[0] and b_shape[0] % 16 == 0 and b_shape[1] % 16 == 0
    monkeypatch.setattr(fl, "ALIGN", 1)
    unpadded = _run(recipe, x, w, g)
    for p, u in zip(padded, unpadded):
        if p is not None:
            assert torch.equal(p, u)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32_out", "bf16_out"])
@pytest.mark.parametrize("a_dtype", [fl.FORWARD_DTYPE, fl.GRAD_DTYPE], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("m,k,n", [(37, 64, 48), (1, 64, 48), (37, 80, 1), (1, 32, 1), (5, 16, 33)])
def test_cpu_tensorwise_product_takes_row_and_column_scales(m, k, n, a_dtype, out_dtype, monkeypatch):
    """On CPU a per-tensor product reaches _scaled_mm with its two scalars expanded to contiguous
    [M, 1] / [1, N] scales (torch's CPU kernel for scalar scales on two e4m3 operands is ~100x
    slower). The scaling is unchanged: the result is the scalar-scale product's up to the
    reassociation of a different CPU kernel's sum, a few fp32 ulps of its largest value (2^-20
    of it), and, out in bf16, one bf16 rounding step (2^-7 relative)."""
    gen = torch.Generator().manual_seed(m * 1000 + n)
    a, sa = fl.quantize(torch.randn(m, k, generator=gen), a_dtype, None)
    b, sb = fl.quantize(torch.randn(n, k, generator=gen) * 0.05, fl.FORWARD_DTYPE, None)
    b = b.t()  # column-major, as _mm is handed its second operand
    scalar = torch._scaled_mm(a, b, sa, sb, out_dtype=out_dtype)
    scales = []
    real = torch._scaled_mm

    def spy(a, b, scale_a, scale_b, **kwargs):
        scales.append((tuple(scale_a.shape), scale_a.stride(), tuple(scale_b.shape), scale_b.stride()))
        return real(a, b, scale_a, scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    got = fl._mm(a, b, sa, sb, out_dtype, fast_accum=False)
    assert scales == [((m, 1), (1, 1), (1, n), (n, 1))], scales
    assert got.dtype == out_dtype and got.shape == (m, n)
    rtol = 2 ** -7 if out_dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(got.float(), scalar.float(), rtol=rtol, atol=2 ** -20 * scalar.abs().max().item())


@pytest.mark.parametrize("recipe", RECIPES)
def test_large_values_saturate_instead_of_overflowing(recipe):
    """An outlier sets the scale of its tensor (or row) so nothing overflows; values cast to FP8
    are clamped to the format's range, never inf."""
    x, w, g = _data()
    x[0, 0, 0] = 1e6
    g = g * 1e5
    y, dx, dw, _ = _run(recipe, x, w, g)
    assert all(torch.isfinite(t).all() for t in (y, dx, dw))
    data, inv = fl.quantize(torch.tensor([[1e6, -3.0, 0.0]]), fl.FORWARD_DTYPE, None)
    assert data.float().abs().max().item() == torch.finfo(fl.FORWARD_DTYPE).max
    back = data.float() * inv
    assert back[0, 0].item() == pytest.approx(1e6, rel=2 ** -4) and back[0, 2].item() == 0.0


def test_all_zero_operand_gives_zero_not_nan():
    x, w, g = _data()
    y, dx, dw, _ = _run("rowwise", torch.zeros_like(x), w, g)
    assert torch.count_nonzero(y) == 0 and torch.isfinite(dw).all() and torch.isfinite(dx).all()


def test_layer_spec_swaps_the_four_linears_and_nothing_else():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from engine.model.spec import layer_spec

    plain = layer_spec(False, 10000.0, "torch")
    for recipe in RECIPES:
        spec = layer_spec(False, 10000.0, "torch", fp8=recipe)
        attn = spec.submodules.self_attention.submodules
        mlp = spec.submodules.mlp.keywords["submodules"]
        for cls, base in [(attn.linear_qkv, ColumnParallelLinear), (attn.linear_proj, RowParallelLinear),
                          (mlp.linear_fc1, ColumnParallelLinear), (mlp.linear_fc2, RowParallelLinear)]:
            assert issubclass(cls, base) and cls is not base and cls.fp8_recipe == recipe
        assert attn.core_attention == plain.submodules.self_attention.submodules.core_attention
    attn = plain.submodules.self_attention.submodules
    assert attn.linear_qkv is ColumnParallelLinear and attn.linear_proj is RowParallelLinear


def test_model_keeps_full_precision_weights_and_gradients(runtime):
    """Built the way training builds it: the linears are the FP8 subclasses, every parameter and
    its main gradient stay fp32 (the optimizer's master weights are untouched by FP8)."""
    from engine.config import ModelConfig, ParallelConfig, TrainConfig
    from engine.parallelize import build_model

    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=2,
                        ffn_hidden_size=64, vocab_size=64)
    chunks, _ = build_model(model, ParallelConfig(), TrainConfig(fp8="rowwise"), runtime)
    linears = [m for m in chunks[0].modules() if isinstance(m, (fl.Fp8ColumnParallelLinear, fl.Fp8RowParallelLinear))]
    assert len(linears) == 4 * model.num_layers
    assert all(p.dtype == torch.float32 for p in chunks[0].parameters())
    assert all(p.main_grad.dtype == torch.float32 for p in chunks[0].parameters() if p.requires_grad)


def _micro_batches(recipe, w, batches):
    """Forward and backward of each (x, g) with the one weight leaf w; -> (y, dx) per batch, and dW
    summed over them as gradient accumulation does."""
    outs = []
    for x, g in batches:
        x = x.detach().clone().requires_grad_()
        y = fl.fp8_linear(x, w, None, recipe)
        y.backward(g)
        outs.append((y.detach(), x.grad))
    return outs, w.grad


@pytest.fixture
def weight_quantizations(monkeypatch):
    """How often fl.quantize is handed the weight tensor `counts["w"]`."""
    counts = {"w": None, "n": 0}
    real = fl.quantize

    def spy(t, *args, **kwargs):
        counts["n"] += t is counts["w"]
        return real(t, *args, **kwargs)

    monkeypatch.setattr(fl, "quantize", spy)
    return counts


@pytest.mark.parametrize("recipe", RECIPES)
def test_weight_cache_quantizes_the_weight_once_per_scaling_and_changes_no_bit(recipe, weight_quantizations):
    """Three micro-batches: without the scope the weight is quantized in every forward (and, per row,
    every dgrad); inside it once per scaling, with bit-identical outputs and gradients."""
    x, w0, g = _data()
    batches = [(x * (1 + i), g * (1 - 0.3 * i)) for i in range(3)]
    results = {}
    for cached in (False, True):
        w = w0.clone().requires_grad_()
        weight_quantizations.update(w=w, n=0)
        with fl.weight_cache() if cached else contextlib.nullcontext():
            results[cached] = _micro_batches(recipe, w, batches)
        results[cached] += (weight_quantizations["n"],)
    per_batch = {"tensorwise": 1, "rowwise": 2}[recipe]
    assert results[False][2] == 3 * per_batch and results[True][2] == per_batch
    for (y0, dx0), (y1, dx1) in zip(results[False][0], results[True][0]):
        assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert torch.equal(results[False][1], results[True][1])
    assert fl._weight_cache is None  # dropped with the scope


def test_weight_cache_sees_an_in_place_change_of_the_weight():
    """An in-place update inside the scope (new version counter) is quantized afresh."""
    x, w0, g = _data()
    w = w0.clone().requires_grad_()
    with fl.weight_cache():
        fl.fp8_linear(x, w, None, "tensorwise")
        with torch.no_grad():
            w.mul_(3)
        y = fl.fp8_linear(x, w, None, "tensorwise")
    assert torch.equal(y, fl.fp8_linear(x, w, None, "tensorwise"))
    assert not torch.equal(y, fl.fp8_linear(x, w0, None, "tensorwise"))


def test_weight_cache_scopes_nest():
    x, w, _ = _data()
    with fl.weight_cache():
        with fl.weight_cache():
            fl.fp8_linear(x, w, None, "tensorwise")
        assert len(fl._weight_cache) == 1  # the inner scope left the outer one's cache alone
    assert fl._weight_cache is None
