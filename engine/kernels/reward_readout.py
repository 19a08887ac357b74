"""Fused reward readout: gather the reward rows, RMSNorm them, dot with the value head.

Same semantics as `engine.model.readout.torch_reward_readout`. For each reward i with flat index
idx_i = bi*s + t into the [b, s] token grid, the row x = hidden[t, bi, :] (length h) gives

    rstd   = 1 / sqrt(mean_k x_k^2 + eps)
    xhat   = x * rstd
    y      = xhat * w                       (w = norm_weight [h])
    r_i    = sum_k y_k * v_k                 (v = head_weight, h elements)

all in fp32 whatever the input dtype. With g_i = dL/dr_i the backward is

    dL/dv     = sum_i g_i * y_i
    dL/dw     = sum_i g_i * xhat_i * v
    dy_i      = g_i * v * w                  (gradient wrt xhat_i)
    dL/dx_i   = rstd_i * (dy_i - xhat_i * mean_k(dy_ik * xhat_ik))

dL/dhidden is zero except at the gathered rows. The backward writes each reward's dx_i to an fp32
buffer of n rows ([n, h], the rewards' rows only), then one pass over the s*b rows of grad_hidden
writes every element once in hidden's dtype: zero, or the fp32 sum of the dx_i of the rewards that
read that row (a row gathered twice receives both), in order of appearance, so repeated rows sum
deterministically. The rewards of each row are found without a device sync: a stable sort of the
indices and two searchsorted calls give each row its run [lo, hi) of sorted rewards. An fp32 buffer of
the full [s, b, h] shape (zero-filled, atomically added to, then cast) would move about 5x the bytes of
grad_hidden at 16384 x 4096 in bf16 and sit at the backward's peak of memory. dL/dv and dL/dw are
reduced per program over a strided set of rows (partials [programs, h]) and then summed over
programs in torch.

A program handles tiles of BLOCK_N rewards x the whole row (BLOCK_H = next power of two >= h), which
suits hidden sizes up to several thousand; the readout touches n_candidates rows, so it is never the
step's bottleneck.

An index outside [0, s*b) is never read or written: checking on the host would cost a device sync
every step, so, as the CUDA kernels do, its reward is NaN (which the training loop's non-finite
check reports) and its row adds nothing to any gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sum(x, axis: tl.constexpr):
    # tl.sum is a @triton.jit function of triton.language.standard, which the interpreter cannot call
    # when triton was imported before TRITON_INTERPRET was set (torch._dynamo imports triton).
    # tl.reduce is a builtin, and the interpreter recognises standard's sum combine function by
    # identity and reduces with numpy (a local combine function falls back to a slow python loop).
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _gathered_rows(index_ptr, rows, n, s, num_rows):
    """-> (t, bi, in_n, valid): the token and sequence of each reward at rows, which lanes hold a
    reward, which of those index in [0, num_rows) (the others are never read or written)."""
    in_n = rows < n
    idx = tl.load(index_ptr + rows, mask=in_n, other=0).to(tl.int64)
    valid = in_n & (idx >= 0) & (idx < num_rows)
    return idx % s, idx // s, in_n, valid


@triton.jit
def _readout_fwd_kernel(
    hidden_ptr, index_ptr, norm_w_ptr, head_w_ptr, out_ptr,
    n, s, num_rows, h, stride_s, stride_b, stride_h, eps, nan,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # one program: BLOCK_N rewards x the whole row
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_H)
    col_mask = offs < h
    t, bi, in_n, row_mask = _gathered_rows(index_ptr, rows, n, s, num_rows)
    mask = row_mask[:, None] & col_mask[None, :]
    row_off = t * stride_s + bi * stride_b
    x = tl.load(hidden_ptr + row_off[:, None] + offs[None, :] * stride_h, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(norm_w_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)
    v = tl.load(head_w_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(_sum(x * x, 1) / h + eps)
    r = _sum(x * (w * v)[None, :], 1) * rstd
    tl.store(out_ptr + rows, tl.where(row_mask, r, nan), mask=in_n)


@triton.jit
def _readout_bwd_kernel(
    hidden_ptr, index_ptr, norm_w_ptr, head_w_ptr, grad_out_ptr,
    row_grad_ptr, dw_partial_ptr, dv_partial_ptr,
    n, s, num_rows, h, stride_s, stride_b, stride_h, eps,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # program pid handles the row tiles pid, pid + P, pid + 2P, ... and writes one partial row of dw, dv
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_H)
    col_mask = offs < h
    w = tl.load(norm_w_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)
    v = tl.load(head_w_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.full([BLOCK_H], 0.0, tl.float32)
    dv_acc = tl.full([BLOCK_H], 0.0, tl.float32)
    for tile in range(pid, (n + BLOCK_N - 1) // BLOCK_N, num_programs):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        t, bi, in_n, row_mask = _gathered_rows(index_ptr, rows, n, s, num_rows)
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(hidden_ptr + (t * stride_s + bi * stride_b)[:, None] + offs[None, :] * stride_h,
                    mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_out_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        # rows past n are zeros: with eps = 0 their 1/sqrt(0) would turn 0 * inf into NaN in the sums
        rstd = tl.where(row_mask, 1.0 / tl.sqrt(_sum(x * x, 1) / h + eps), 0.0)
        gxhat = x * (g * rstd)[:, None]                      # g_i * xhat_i (masked rows: 0)
        dv_acc += _sum(gxhat, 0) * w
        dw_acc += _sum(gxhat, 0) * v
        xhat = x * rstd[:, None]
        dy = g[:, None] * (v * w)[None, :]
        dx = rstd[:, None] * (dy - xhat * (_sum(dy * xhat, 1) / h)[:, None])
        # row i of the [n, h] buffer: reward i's dx (rows of out-of-range indices are never read)
        tl.store(row_grad_ptr + rows.to(tl.int64)[:, None] * h + offs[None, :], dx, mask=mask)
    tl.store(dw_partial_ptr + pid * h + offs, dw_acc, mask=col_mask)
    tl.store(dv_partial_ptr + pid * h + offs, dv_acc, mask=col_mask)


@triton.jit
def _cast_rtne(x, dtype: tl.constexpr):
    """x (fp32) -> dtype, rounded to nearest even. The interpreter truncates a plain fp32 -> bf16
    cast (the GPU rounds), so bf16 is rounded on the bits here, the same on both: add 0x7FFF plus
    the lowest kept bit, keep the high half. NaN stays NaN (a NaN with only low mantissa bits would
    otherwise round to inf)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where(x != x, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _readout_rows_kernel(
    row_grad_ptr, order_ptr, lo_ptr, hi_ptr, grad_hidden_ptr,
    s, h, gstride_s, gstride_b, BLOCK_H: tl.constexpr,
):
    # one program: hidden row r (flat index bi*s + t), written once in full: the fp32 sum over the
    # rewards order[lo[r]:hi[r]] that read it, zero where there are none
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    col_mask = offs < h
    acc = tl.full([BLOCK_H], 0.0, tl.float32)
    for j in range(tl.load(lo_ptr + r), tl.load(hi_ptr + r)):
        i = tl.load(order_ptr + j)
        acc += tl.load(row_grad_ptr + i * h + offs, mask=col_mask, other=0.0)
    out = grad_hidden_ptr + (r % s) * gstride_s + (r // s) * gstride_b + offs
    tl.store(out, _cast_rtne(acc, grad_hidden_ptr.dtype.element_ty), mask=col_mask)


def _empty(shape, device, dtype):
    """Buffers the kernels write in full (tests swap in a NaN-filled allocator to prove it)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _block_h(h: int) -> int:
    return triton.next_power_of_2(h)


def _block_n(block_h: int) -> int:
    # rows per tile: keep a tile at about 4096 fp32 values (registers on the GPU; programs in the interpreter)
    return max(1, min(16, 4096 // block_h))


def _num_warps(block_h: int) -> int:
    return 4 if block_h <= 2048 else 8


def _check(hidden, reward_index, norm_weight, head_weight):
    if hidden.dim() != 3:
        raise ValueError(f"reward_readout: hidden must be [s, b, h], got {tuple(hidden.shape)}")
    h = hidden.shape[2]
    if norm_weight.numel() != h or head_weight.numel() != h:
        raise ValueError(
            f"reward_readout: norm_weight ({norm_weight.numel()}) and head_weight ({head_weight.numel()}) "
            f"must have h={h} elements")
    if reward_index.dim() != 1 or reward_index.dtype not in (torch.int32, torch.int64):
        raise ValueError("reward_index must be a 1-d int32/int64 tensor")


def reward_readout_fwd(hidden, reward_index, norm_weight, head_weight, eps: float) -> torch.Tensor:
    """Launcher: -> rewards [n] fp32."""
    _check(hidden, reward_index, norm_weight, head_weight)
    s, b, h = hidden.shape
    n = reward_index.numel()
    out = _empty((n,), hidden.device, torch.float32)
    if n == 0:
        return out
    index = reward_index.contiguous()
    norm_w = norm_weight.contiguous().reshape(h)
    head_w = head_weight.contiguous().reshape(h)
    block_h = _block_h(h)
    block_n = _block_n(block_h)
    _readout_fwd_kernel[(triton.cdiv(n, block_n),)](
        hidden, index, norm_w, head_w, out,
        n, s, s * b, h, hidden.stride(0), hidden.stride(1), hidden.stride(2), float(eps), float("nan"),
        BLOCK_N=block_n, BLOCK_H=block_h, num_warps=_num_warps(block_h),
    )
    return out


def _num_programs(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 8
    return max(1, min(n, sms))


def reward_readout_bwd(grad_out, hidden, reward_index, norm_weight, head_weight, eps: float):
    """Launcher: -> (grad_hidden like hidden, grad_norm_weight like norm_weight, grad_head_weight like head_weight)."""
    s, b, h = hidden.shape
    n = reward_index.numel()
    device = hidden.device
    # written in full by _readout_rows_kernel: zeros and the gathered rows' gradients, in hidden's dtype
    grad_hidden = _empty((s, b, h), device, hidden.dtype)
    block_h = _block_h(h)
    block_n = _block_n(block_h)
    programs = _num_programs(triton.cdiv(n, block_n), device)
    index = reward_index.contiguous()
    if n == 0:
        dw_partial = torch.zeros((1, h), device=device, dtype=torch.float32)
        dv_partial = torch.zeros((1, h), device=device, dtype=torch.float32)
        row_grad = torch.zeros((1, h), device=device, dtype=torch.float32)
    else:
        dw_partial = _empty((programs, h), device, torch.float32)
        dv_partial = _empty((programs, h), device, torch.float32)
        row_grad = _empty((n, h), device, torch.float32)
        _readout_bwd_kernel[(programs,)](
            hidden, index, norm_weight.contiguous().reshape(h),
            head_weight.contiguous().reshape(h), grad_out.contiguous().to(torch.float32),
            row_grad, dw_partial, dv_partial,
            n, s, s * b, h, hidden.stride(0), hidden.stride(1), hidden.stride(2), float(eps),
            BLOCK_N=block_n, BLOCK_H=block_h, num_warps=_num_warps(block_h),
        )
    # out-of-range indices sort past every row (key s*b); a stable sort keeps repeats in reward order
    key = index.to(torch.int64)
    key = torch.where((key >= 0) & (key < s * b), key, s * b)
    sorted_key, order = torch.sort(key, stable=True)
    rows = torch.arange(s * b, device=device, dtype=torch.int64)
    lo = torch.searchsorted(sorted_key, rows)
    hi = torch.searchsorted(sorted_key, rows, right=True)
    if s * b > 0:
        _readout_rows_kernel[(s * b,)](
            row_grad, order, lo, hi, grad_hidden, s, h, grad_hidden.stride(0), grad_hidden.stride(1),
            BLOCK_H=block_h, num_warps=_num_warps(block_h),
        )
    grad_norm = dw_partial.sum(0).reshape(norm_weight.shape).to(norm_weight.dtype)
    grad_head = dv_partial.sum(0).reshape(head_weight.shape).to(head_weight.dtype)
    return grad_hidden, grad_norm, grad_head


# ---- custom ops ---------------------------------------------------------------------------------

@torch.library.custom_op("polar::reward_readout", mutates_args=())
def _reward_readout_op(hidden: torch.Tensor, reward_index: torch.Tensor, norm_weight: torch.Tensor,
                       head_weight: torch.Tensor, eps: float) -> torch.Tensor:
    return reward_readout_fwd(hidden, reward_index, norm_weight, head_weight, eps)


@_reward_readout_op.register_fake
def _(hidden, reward_index, norm_weight, head_weight, eps):
    return hidden.new_empty(reward_index.shape[0], dtype=torch.float32)


@torch.library.custom_op("polar::reward_readout_backward", mutates_args=())
def _reward_readout_backward_op(grad_out: torch.Tensor, hidden: torch.Tensor, reward_index: torch.Tensor,
                                norm_weight: torch.Tensor, head_weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reward_readout_bwd(grad_out, hidden, reward_index, norm_weight, head_weight, eps)


@_reward_readout_backward_op.register_fake
def _(grad_out, hidden, reward_index, norm_weight, head_weight, eps):
    return (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
            torch.empty_like(norm_weight), torch.empty_like(head_weight))


def _setup_context(ctx, inputs, output):
    hidden, reward_index, norm_weight, head_weight, eps = inputs
    ctx.save_for_backward(hidden, reward_index, norm_weight, head_weight)
    ctx.eps = eps


def _backward(ctx, grad_out):
    hidden, reward_index, norm_weight, head_weight = ctx.saved_tensors
    grad_hidden, grad_norm, grad_head = _reward_readout_backward_op(
        grad_out, hidden, reward_index, norm_weight, head_weight, ctx.eps)
    return grad_hidden, None, grad_norm, grad_head, None


_reward_readout_op.register_autograd(_backward, setup_context=_setup_context)


def reward_readout(hidden, reward_index, norm_weight, head_weight, eps: float) -> torch.Tensor:
    """hidden [s, b, h], reward_index [n] (bi*s + t) -> rewards [n] in fp32 (differentiable)."""
    return _reward_readout_op(hidden, reward_index, norm_weight, head_weight, float(eps))
