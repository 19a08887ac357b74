"""FP8 matrix products inside megatron's tensor-parallel linear layers (the local layer spec).

The recipe is float8 training with current scaling, as torchao's float8 training does it: before
each matrix product every operand is scaled so that its absolute maximum (amax) lands on the FP8
format's largest finite value, cast with saturation, multiplied by `torch._scaled_mm` (which
applies the inverse scales and accumulates in high precision), and the result returns in the
training dtype. Forward operands (activations, weights) are e4m3 (3 mantissa bits, range +-448);
output gradients are e5m2 (2 mantissa bits, range +-57344: gradients span more octaves). Scales
are one per tensor (`tensorwise`) or one per row of each operand along the product's
contraction dimension (`rowwise`, scales rounded down to powers of two as torchao's rowwise recipe
does, so scaling itself is exact). Weights, their gradients and the optimizer state stay in the
training dtype: only the operands of the three products are FP8.

A linear y = x W^T runs three products (M tokens, K inputs, N outputs):
    forward  y [M, N] = x [M, K]     @ W^T [K, N]
    dgrad   dx [M, K] = dy [M, N]    @ W [N, K]
    wgrad   dW [N, K] = dy^T [N, M]  @ x [M, K]
`_scaled_mm` wants the first operand row-major, the second column-major, and (on CUDA) both
dimensions of the second a multiple of 16; the model dimensions are checked at start-up
(engine.fp8), the token count M is the contraction dimension of wgrad only, and is padded there
with zero rows after the scales are taken, so the padding enters neither the amax nor the result.

Tensor parallelism stays megatron's: these classes subclass ColumnParallelLinear and
RowParallelLinear and replace only `_forward_impl`, the matrix product between megatron's own
communication (dgrad all-reduce, the row-parallel output reduction or reduce-scatter). One thing TP
adds: an operand split over the TP ranks along a dimension its amax spans would get a different
scale on each rank than on one process, so that amax is max-reduced over the TP group first (per
tensor: the sharded tensors; per row: only where the contraction dimension is the sharded one),
which makes every scale equal to the single-process one.

Sequence parallelism, column-parallel: megatron all-gathers the input's token shards in the training
dtype, and its own linear keeps only the shard for the backward, gathering it again for wgrad. Fed
the gathered input, the FP8 product kept all of it: TP times the shard (per tensor its FP8 copy, per
row the bf16 input; measured on TP2, tests/engine/model/test_fp8_sequence_parallel.py). Here the
product takes the shard itself: it quantizes the shard (per tensor with the TP-max-reduced amax, per
row with the rows' own scales), all-gathers the FP8 bytes (and row scales), half of bf16's traffic
as Transformer Engine does, and keeps the shard: per tensor its FP8 copy, per row the bf16 shard
(wgrad scales x per column over all tokens, so the rescaling waits for the gather in the backward).
Quantization is element-wise and max is exact, so the results are bit for bit those of quantizing
the gathered input.

Weight cache. A weight changes only at the optimizer step, yet each micro-batch would quantize it
again (reading it, writing the scaled copy and the FP8 copy, and all-reducing its amax over TP).
Inside `weight_cache()`, opened around one optimizer step's forward-backward schedule, a weight's
(FP8 data, inverse scale) is computed at its first use and reused by micro-batches 2..n, by the
backward and by recomputed forwards; leaving the scope drops it, so no forward after the optimizer
step (which must run outside the scope) is served a stale copy. Keying on `weight._version` alone
would not do: megatron's distributed optimizer writes the updated weights into its parameter buffer
through `.data`, which leaves the parameters' version counters unchanged (measured: a weight's
version stayed 0 over a 3-step engine run while its values changed). The key is the weight's identity, the scaling
(recipe: per tensor, or per row along dim 1 / dim 0) and the TP group; an in-place change inside the
scope (new `_version` or storage) recomputes. Every TP rank runs the same micro-batches in the same
scope, so they hit and miss together and the amax all-reduces stay matched. Memory held while the
scope is open: one FP8 copy of each weight per scaling used, so 1 byte per parameter with the
per-tensor recipe (the forward's copy, which backward reuses; without the cache each micro-batch in
flight saved a copy of its own for backward) and 2 bytes per parameter with the per-row recipe (the
forward's dim-1 and dgrad's dim-0 copies), plus the scales; outside it nothing is cached and every
call quantizes, as before.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

FORWARD_DTYPE = torch.float8_e4m3fn
GRAD_DTYPE = torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise")
ALIGN = 16  # _scaled_mm on CUDA: the second operand's dimensions are multiples of 16
_EPS = 1e-12  # an all-zero operand gets a finite scale


def quantize(t: torch.Tensor, dtype: torch.dtype, dim: int | None, group=None, pow2: bool = False):
    """t [R, C] -> (FP8 data, inverse scale). dim=None: one scale; dim=1 / 0: one per row / column
    (amax along that dim, kept as [R, 1] / [1, C]). `group`: max-reduce the amax over it first."""
    a = t.detach()
    amax = a.abs().amax() if dim is None else a.abs().amax(dim=dim, keepdim=True)
    amax = amax.float()
    if group is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    # in float64, rounded once to fp32 (as torchao does): the scale is the correctly rounded ratio
    scale = (torch.finfo(dtype).max / amax.double().clamp(min=_EPS)).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    fmax = torch.finfo(dtype).max
    data = (a.float() * scale).clamp(-fmax, fmax).to(dtype)
    return data, scale.reciprocal()


_weight_cache: dict | None = None  # None outside weight_cache()
_cache_depth = 0


@contextlib.contextmanager
def weight_cache():
    """Within it, each weight is quantized once per scaling (see the module docstring). Re-entrant:
    only the outermost scope creates and drops the cache."""
    global _weight_cache, _cache_depth
    if _cache_depth == 0:
        _weight_cache = {}
    _cache_depth += 1
    try:
        yield
    finally:
        _cache_depth -= 1
        if _cache_depth == 0:
            _weight_cache = None


def quantize_weight(weight: torch.Tensor, dim: int | None, group=None, pow2: bool = False):
    """quantize(weight, FORWARD_DTYPE, dim, group, pow2), from the cache inside weight_cache()."""
    if _weight_cache is None:
        return quantize(weight, FORWARD_DTYPE, dim, group, pow2)
    key = (id(weight), dim, pow2, id(group))
    stamp = (weight._version, weight.data_ptr())
    hit = _weight_cache.get(key)
    # the weak reference tells a freed tensor whose id was reused from the weight itself
    if hit is not None and hit[0]() is weight and hit[1] == stamp:
        return hit[2]
    quantized = quantize(weight, FORWARD_DTYPE, dim, group, pow2)
    _weight_cache[key] = (weakref.ref(weight), stamp, quantized)
    return quantized


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored column-major (what _scaled_mm wants of its second operand)."""
    return t.t().contiguous().t()


def _pad_inner(a: torch.Tensor, b: torch.Tensor):
    """a [R, M] (row-major), b [M, C] (column-major) -> both with M zero-padded to a multiple of
    ALIGN. Zero bytes are +0.0 in both FP8 formats; padding after quantisation keeps it out of
    the scales, and zero rows add nothing to the product."""
    pad = (-a.shape[1]) % ALIGN
    if pad == 0:
        return a, b
    a = F.pad(a.view(torch.uint8), (0, pad)).view(a.dtype)
    b = F.pad(b.t().view(torch.uint8), (0, pad)).view(b.dtype).t()
    return a, b


def _mm(a, b, scale_a, scale_b, out_dtype, fast_accum: bool):
    """a @ b with inverse scales. Row-wise scaled products on CUDA return bf16 only."""
    mm_dtype = out_dtype
    if a.is_cuda and scale_a.numel() > 1 and out_dtype != torch.bfloat16:
        mm_dtype = torch.bfloat16
    # Tensor-wise scales are scalars (on CUDA; CPU below); row-wise scales keep their [M, 1] / [1, N]
    # shapes even when M or N is 1 (a lone [1, 1] row scale beside a [1, N] one is refused by
    # _scaled_mm), with standard strides: a transposed [N, 1] view has stride 48 on its size-1 dim.
    tensorwise = scale_a.numel() == 1 and scale_b.numel() == 1
    if tensorwise and a.device.type == "cpu":
        # torch's CPU kernel for scalar scales on two e4m3 operands is 100x and more slower than its
        # row-scaled one (torch 2.13, one thread, measured: 4096x64x128 4.0 s against 5 ms; e5m2 x
        # e4m3 is fast either way), so on CPU the same two scalars go in as [M, 1] / [1, N] scales,
        # freshly allocated (an expanded, stride-0 scale is refused). The scaling stays per tensor;
        # the result differs from the scalar form by the kernel's summation order only (fp32: a few
        # ulps, bf16: one rounding step). CUDA keeps the scalar form, its fast per-tensor kernel.
        scale_a = scale_a.reshape(1).repeat(a.shape[0]).view(-1, 1)
        scale_b = scale_b.reshape(1).repeat(b.shape[1]).view(1, -1)
    elif tensorwise:
        scale_a, scale_b = scale_a.reshape(()), scale_b.reshape(())
    else:
        scale_a = scale_a.reshape(-1).view(scale_a.shape)
        scale_b = scale_b.reshape(-1).view(scale_b.shape)
    out = torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=mm_dtype, use_fast_accum=fast_accum and a.is_cuda)
    return out.to(out_dtype)


def _gather_rows(t: torch.Tensor, group, async_op: bool = False):
    """t [m, ...] of each rank -> [tp m, ...] in rank order (megatron's sequence-parallel all-gather);
    FP8 goes as its bytes. With async_op: (the result, to be read after the returned work's wait())."""
    out = torch.empty((t.shape[0] * group.size(), *t.shape[1:]), dtype=t.dtype, device=t.device)
    one_byte = t.dtype in (FORWARD_DTYPE, GRAD_DTYPE)
    raw = out.view(torch.uint8) if one_byte else out
    work = dist.all_gather_into_tensor(raw, t.contiguous().view(raw.dtype), group=group, async_op=async_op)
    return (out, work) if async_op else out


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T (+ bias) with the three products in FP8; see the module docstring.

    `x_group` / `w_group` / `dy_group`: the TP group when that operand is split over TP ranks
    (x: along K, row-parallel; W: along N or K; dy: along N, column-parallel), else None.
    `sp_group`: x is this rank's shard of the tokens (M) under sequence parallelism, the product's
    input all of them (column-parallel). x is quantized here and all-gathered in FP8 with its scales,
    and only the shard is kept for the backward (FP8 per tensor, the training dtype per row, as
    megatron's bf16 linear keeps its shard), gathered again there for wgrad; dx, the gradient of the
    whole input, is reduce-scattered back to the shard. The values are those of gathering x in the
    training dtype first: a per-tensor amax is max-reduced over the group (max is exact), per-row
    scales are the rows' own, and quantization is element-wise."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe, x_group, w_group, dy_group, sp_group=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rowwise = recipe == "rowwise"
        if rowwise:  # contraction over K: amax along K for both (reduced where K is split)
            xq, xs = quantize(x2, FORWARD_DTYPE, 1, x_group, pow2=True)
            wq, ws = quantize_weight(weight, 1, w_group if x_group is not None else None, pow2=True)
            ctx.save_for_backward(x2, weight)  # wgrad scales x per column over all tokens: rescaled there
        else:
            xq, xs = quantize(x2, FORWARD_DTYPE, None, x_group if sp_group is None else sp_group)
            wq, ws = quantize_weight(weight, None, w_group)
            ctx.save_for_backward(xq, xs, wq, ws)  # FP8 copies: a quarter of fp32, half of bf16
        out_shape = shape
        if sp_group is not None:
            xq = _gather_rows(xq, sp_group)
            if rowwise:
                xs = _gather_rows(xs, sp_group)
            out_shape = (shape[0] * sp_group.size(), *shape[1:])
        y = _mm(xq, wq.t(), xs, ws.t(), x.dtype, fast_accum=True)
        if bias is not None:
            y = y + bias
        ctx.meta = (recipe, shape, x.dtype, weight.dtype, bias is not None, x_group, w_group, dy_group, sp_group)
        return y.view(*out_shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        recipe, shape, x_dtype, w_dtype, has_bias, x_group, w_group, dy_group, sp_group = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dw = None
        saved = ctx.saved_tensors
        # Under SP the communication overlaps the products as in megatron's linear: the kept shard's gather
        # (wgrad contracts over all tokens) runs during dgrad and dx's reduce-scatter during wgrad. A
        # collective waits for those issued before it on its group (NCCL: one stream per communicator), so
        # dgrad's operands, whose scales all-reduce over the same TP group, are quantized before the gather.
        if recipe == "rowwise":
            x2, weight = saved
            if need_dx:  # contraction over N: dy and W along N (split on column-parallel ranks)
                dyq, dys = quantize(dy2, GRAD_DTYPE, 1, dy_group, pow2=True)
                wq, ws = quantize_weight(weight, 0, w_group if dy_group is not None else None, pow2=True)
        else:
            xq, xs, wq, ws = saved
            dyq, dys = quantize(dy2, GRAD_DTYPE, None, dy_group)
        gathered = _gather_rows(saved[0], sp_group, async_op=True) if need_dw and sp_group is not None else None
        if need_dx:
            dx = _mm(dyq, _column_major(wq), dys, ws, x_dtype, fast_accum=False)
        scattered = None
        if dx is not None and sp_group is not None:  # what megatron's all-gather backward does
            part = dx.new_empty((dx.shape[0] // sp_group.size(), dx.shape[1]))
            scattered = (part, dist.reduce_scatter_tensor(part, dx, group=sp_group, async_op=True))
        if need_dw and recipe == "rowwise":  # contraction over M (never split over TP once gathered): along the tokens
            dyq, dys = quantize(dy2, GRAD_DTYPE, 0, None, pow2=True)
            xq, xs = quantize(_waited(gathered, x2), FORWARD_DTYPE, 0, None, pow2=True)
            a, b = _pad_inner(dyq.t().contiguous(), _column_major(xq))
            dw = _mm(a, b, dys.t(), xs, w_dtype, fast_accum=False)
        elif need_dw:
            a, b = _pad_inner(dyq.t().contiguous(), _column_major(_waited(gathered, xq)))
            dw = _mm(a, b, dys, xs, w_dtype, fast_accum=False)
        if dx is not None:
            dx = _waited(scattered, dx).view(shape)
        db = dy2.sum(0).to(w_dtype) if has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None


def _waited(pending, local):
    """The result of an async collective (result, work) once it has finished, or `local` where none ran."""
    if pending is None:
        return local
    out, work = pending
    work.wait()
    return out


def fp8_linear(x, weight, bias, recipe: str, x_group=None, w_group=None, dy_group=None, sp_group=None):
    if recipe not in RECIPES:
        raise ValueError(f"FP8 recipe {recipe!r}: expected one of {RECIPES}")
    return _Fp8Linear.apply(x, weight, bias, recipe, x_group, w_group, dy_group, sp_group)


def _tp(group):
    return group if group is not None and group.size() > 1 else None


class Fp8ColumnParallelLinear(ColumnParallelLinear):
    """megatron's ColumnParallelLinear with its matrix product in FP8. W [N/tp, K] is split along
    N, and so is dy; x is whole (under sequence parallelism all-gathered in FP8 by the product
    itself, which keeps only this rank's shard for the backward, as megatron's own linear does)."""

    fp8_recipe = "tensorwise"

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, **unused):
        tp = _tp(self.tp_group)
        if sequence_parallel and tp is not None:
            return fp8_linear(input, weight, bias, self.fp8_recipe, w_group=tp, dy_group=tp, sp_group=tp)
        if allreduce_dgrad:  # identity forward, all-reduce of dx backward
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return fp8_linear(input, weight, bias, self.fp8_recipe, x_group=None, w_group=tp, dy_group=tp)


class Fp8RowParallelLinear(RowParallelLinear):
    """megatron's RowParallelLinear with its matrix product in FP8. W [N, K/tp] and x [M, K/tp]
    are split along K; dy is whole. megatron reduces (or reduce-scatters) the output itself."""

    fp8_recipe = "tensorwise"

    def _forward_impl(self, input, weight, bias=None, **unused):
        tp = _tp(self.tp_group)
        return fp8_linear(input, weight, bias, self.fp8_recipe, x_group=tp, w_group=tp, dy_group=None)


_CLASSES: dict = {}


def fp8_classes(recipe: str):
    """(column, row) classes for one recipe. Subclasses, not partials: megatron builds layers by
    calling the spec's class, and issubclass checks on it keep working."""
    if recipe not in RECIPES:
        raise ValueError(f"FP8 recipe {recipe!r}: expected one of {RECIPES}")
    if recipe not in _CLASSES:
        tag = recipe.capitalize()
        _CLASSES[recipe] = (
            type(f"Fp8{tag}ColumnParallelLinear", (Fp8ColumnParallelLinear,), {"fp8_recipe": recipe}),
            type(f"Fp8{tag}RowParallelLinear", (Fp8RowParallelLinear,), {"fp8_recipe": recipe}),
        )
    return _CLASSES[recipe]


def with_fp8_linears(spec, recipe: str):
    """The local layer spec with linear_qkv / linear_fc1 (column-parallel) and linear_proj /
    linear_fc2 (row-parallel) swapped for their FP8 subclasses; everything else untouched."""
    import copy
    import dataclasses
    import functools

    column, row = fp8_classes(recipe)
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention.submodules
    if attn.linear_qkv is not ColumnParallelLinear or attn.linear_proj is not RowParallelLinear:
        raise ValueError("FP8 linears replace megatron's local ColumnParallelLinear / RowParallelLinear only")
    attn.linear_qkv, attn.linear_proj = column, row
    mlp = spec.submodules.mlp
    if isinstance(mlp, functools.partial):  # megatron-core >= 0.16: MLP.as_mlp_submodule partial
        subs = dataclasses.replace(mlp.keywords["submodules"], linear_fc1=column, linear_fc2=row)
        spec.submodules.mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": subs})
    else:  # a ModuleSpec
        mlp.submodules = dataclasses.replace(mlp.submodules, linear_fc1=column, linear_fc2=row)
    return spec
