"""Shared-prefix flash attention (Triton): forward, backward, and the tiles each program visits.

Same semantics as `engine.model.shared_prefix_attention.torch_shared_prefix_attention`. With the
packed layout split into pieces (a group's prefix, each candidate, each padding token: contiguous
runs, as `engine.packing.collate` lays them out), piece(i) the piece of token i and prefix(i) the
piece of its group's prefix (piece(i) itself for prefix and padding tokens), query i sees key j iff

    j <= i  and  piece(j) in {piece(i), prefix(i)}

which is `engine.packing.dense_mask` for such layouts. Per head, with s_ij = scale * q_i.k_j,

    forward    m_i = max_j s_ij,  l_i = sum_j e^(s_ij - m_i),  o_i = sum_j e^(s_ij - m_i) v_j / l_i,
               lse_i = m_i + log l_i  (saved, in base 2: the kernels use exp2)
    backward   p_ij = e^(s_ij - lse_i),  delta_i = do_i . o_i,  ds_ij = p_ij (do_i . v_j - delta_i)
               dv_j = sum_i p_ij do_i,  dk_j = scale sum_i ds_ij q_i,  dq_i = scale sum_j ds_ij k_j

with every sum over visible pairs only, accumulated in fp32 (online softmax in the forward).

Tiling and skipping. A forward program owns BLOCK_M queries of one (row, head) and visits only the
key tiles of two ranges computed on the device from the layout (`attention_schedule.py`, cached
per layout tensor): the group prefix its candidate queries read, [min group start, max prefix end), and
its own causal span [min piece start, tile end); one range when they touch. A sibling candidate's or
another group's tile is never visited, except inside a tile that straddles a piece boundary, where
the elementwise mask applies. The dK/dV program owns BLOCK_N keys of one KV head and visits the query
tiles [tile start, max over its keys of (prefix key ? group end : piece end)) for each query head of
its GQA group in turn, so the GQA reduction happens in registers, in a fixed order.

Determinism. dq is accumulated either by fp32 atomics from the dK/dV program (fast path: 5 matmuls
per visited tile pair; the summation order, so the last bits, vary between runs) or by a separate dQ
program that walks the forward's key ranges again (deterministic: 7 matmuls, no atomics anywhere).

FLOPs (`attention_schedule.attention_flops`): the forward does 4 * d * pairs per query head (QK^T
and PV, a multiply and an add each), the backward 2.5 times that (five matmuls against two,
recomputation not counted), where pairs is the number of visible (query, key) pairs, padding
excluded.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from engine.kernels.attention_schedule import key_schedule, query_schedule, token_metadata
from engine.packing import LayoutCache

_LOG2E = 1.4426950408889634


@triton.jit
def _sum(x, axis: tl.constexpr):
    # tl.sum / tl.max are jit functions of triton.language.standard, which the interpreter cannot call
    # when triton was imported before TRITON_INTERPRET was set; tl.reduce with standard's combine
    # functions is a builtin and runs on numpy (see reward_readout.py).
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _visible(pid_q, ppid_q, offs_m, pid_k, offs_n):
    # [BM, BN]: key j is in the query's own piece or its group's prefix, and not after it
    same = (pid_k[None, :] == pid_q[:, None]) | (pid_k[None, :] == ppid_q[:, None])
    return same & (offs_n[None, :] <= offs_m[:, None])


@triton.jit
def _load_rows(base, offs, stride, offs_d, ok, DOT_F32: tl.constexpr):
    # one [len(offs), D] tile of a [s, ..., D] tensor whose head dim has stride 1; rows past L read 0
    x = tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=ok[:, None], other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _query_pieces(PIECE, bi, L, offs_m, row_ok):
    # rows past L get piece ids no key has, so they see nothing and are never stored
    pid_q = tl.load(PIECE + bi * 2 * L + offs_m, mask=row_ok, other=-2)
    ppid_q = tl.load(PIECE + bi * 2 * L + L + offs_m, mask=row_ok, other=-2)
    return pid_q, ppid_q


@triton.jit
def _key_ranges(SCHED, tile):
    # a query tile's key tiles: [a0, a0 + n_a) then [b0, ...), n_total in all (query_schedule)
    a0 = tl.load(SCHED + tile * 4)
    n_a = tl.load(SCHED + tile * 4 + 1) - a0
    b0 = tl.load(SCHED + tile * 4 + 2)
    n_total = n_a + tl.load(SCHED + tile * 4 + 3) - b0
    return a0, n_a, b0, n_total


@triton.jit
def _key_tile(it, a0, n_a, b0, k_base, v_base, sk_s, sv_s, PIECE, bi, L, offs_d,
              BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    # the it-th key tile a query tile visits: its keys, values and piece ids
    t = tl.where(it < n_a, a0 + it, b0 + it - n_a)
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < L
    k = _load_rows(k_base, offs_n, sk_s, offs_d, col_ok, DOT_F32)
    v = _load_rows(v_base, offs_n, sv_s, offs_d, col_ok, DOT_F32)
    pid_k = tl.load(PIECE + bi * 2 * L + offs_n, mask=col_ok, other=-3)
    return offs_n, k, v, pid_k


@triton.jit
def _query_program(n_qt, HQ, GROUP: tl.constexpr, L, BLOCK_M: tl.constexpr):
    # (query tile, row x head) of this program; the heaviest query tiles (late in the sequence:
    # longest causal span) start first
    qt = n_qt - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // HQ
    h = bh % HQ
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    return qt, bh, bi, h, h // GROUP, offs_m, offs_m < L


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, PIECE, SCHED, scale_log2,
    sq_s, sq_b, sq_h, sk_s, sk_b, sk_h, sv_s, sv_b, sv_h, so_s, so_b, so_h,
    L, HQ, n_qt,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    qt, bh, bi, h, hk, offs_m, row_ok = _query_program(n_qt, HQ, GROUP, L, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _load_rows(Q + bi * sq_b + h * sq_h, offs_m, sq_s, offs_d, row_ok, DOT_F32)
    pid_q, ppid_q = _query_pieces(PIECE, bi, L, offs_m, row_ok)
    a0, n_a, b0, n_total = _key_ranges(SCHED, bi * n_qt + qt)
    k_base = K + bi * sk_b + hk * sk_h
    v_base = V + bi * sv_b + hk * sv_h
    # a finite start keeps exp2(m_old - m_new) finite for rows that see nothing in a visited tile
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for it in range(0, n_total):
        offs_n, k, v, pid_k = _key_tile(it, a0, n_a, b0, k_base, v_base, sk_s, sv_s, PIECE, bi, L, offs_d,
                                        BLOCK_N, DOT_F32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        s = tl.where(_visible(pid_q, ppid_q, offs_m, pid_k, offs_n), s, float("-inf"))
        m_new = tl.maximum(m_i, _max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + _sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tl.store(O + bi * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * L + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, so_s, so_b, so_h, sd_s, sd_b, sd_h, L, HQ,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    bi = bh // HQ
    h = bh % HQ
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < L
    o = tl.load(O + bi * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + bi * sd_b + h * sd_h + offs_m[:, None] * sd_s + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)
    tl.store(DELTA + bh * L + offs_m, _sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, PIECE, KSCHED, scale, scale_log2,
    sq_s, sq_b, sq_h, sk_s, sk_b, sk_h, sv_s, sv_b, sv_h, sd_s, sd_b, sd_h,
    sdq_s, sdq_b, sdq_h, sdk_s, sdk_b, sdk_h, sdv_s, sdv_b, sdv_h,
    L, HQ, HKV, n_kt,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    kt = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // HKV
    hk = bh % HKV
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < L
    k = _load_rows(K + bi * sk_b + hk * sk_h, offs_n, sk_s, offs_d, col_ok, DOT_F32)
    v = _load_rows(V + bi * sv_b + hk * sv_h, offs_n, sv_s, offs_d, col_ok, DOT_F32)
    pid_k = tl.load(PIECE + bi * 2 * L + offs_n, mask=col_ok, other=-3)
    q_lo = tl.load(KSCHED + (bi * n_kt + kt) * 2)
    q_hi = tl.load(KSCHED + (bi * n_kt + kt) * 2 + 1)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for qt in range(q_lo, q_hi):
            offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < L
            q = _load_rows(Q + bi * sq_b + h * sq_h, offs_m, sq_s, offs_d, row_ok, DOT_F32)
            do = _load_rows(DO + bi * sd_b + h * sd_h, offs_m, sd_s, offs_d, row_ok, DOT_F32)
            lse = tl.load(LSE + (bi * HQ + h) * L + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + (bi * HQ + h) * L + offs_m, mask=row_ok, other=0.0)
            pid_q, ppid_q = _query_pieces(PIECE, bi, L, offs_m, row_ok)
            # transposed tiles [BLOCK_N, BLOCK_M]: keys on rows, so dK and dV accumulate without transposes
            s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale_log2
            vis_t = tl.trans(_visible(pid_q, ppid_q, offs_m, pid_k, offs_n))
            # where, not a product: exp2 of a masked score may overflow, and inf * 0 would be NaN
            p_t = tl.where(vis_t, tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PREC) * scale
                tl.atomic_add(DQ + bi * sdq_b + h * sdq_h + offs_m[:, None] * sdq_s + offs_d[None, :], dq,
                              mask=row_ok[:, None])
    tl.store(DK + bi * sdk_b + hk * sdk_h + offs_n[:, None] * sdk_s + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + bi * sdv_b + hk * sdv_h + offs_n[:, None] * sdv_s + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, PIECE, SCHED, scale, scale_log2,
    sq_s, sq_b, sq_h, sk_s, sk_b, sk_h, sv_s, sv_b, sv_h, sd_s, sd_b, sd_h, sdq_s, sdq_b, sdq_h,
    L, HQ, n_qt,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    qt, bh, bi, h, hk, offs_m, row_ok = _query_program(n_qt, HQ, GROUP, L, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _load_rows(Q + bi * sq_b + h * sq_h, offs_m, sq_s, offs_d, row_ok, DOT_F32)
    do = _load_rows(DO + bi * sd_b + h * sd_h, offs_m, sd_s, offs_d, row_ok, DOT_F32)
    lse = tl.load(LSE + bh * L + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * L + offs_m, mask=row_ok, other=0.0)
    pid_q, ppid_q = _query_pieces(PIECE, bi, L, offs_m, row_ok)
    a0, n_a, b0, n_total = _key_ranges(SCHED, bi * n_qt + qt)
    k_base = K + bi * sk_b + hk * sk_h
    v_base = V + bi * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for it in range(0, n_total):
        offs_n, k, v, pid_k = _key_tile(it, a0, n_a, b0, k_base, v_base, sk_s, sv_s, PIECE, bi, L, offs_d,
                                        BLOCK_N, DOT_F32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        p = tl.where(_visible(pid_q, ppid_q, offs_m, pid_k, offs_n), tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + bi * sdq_b + h * sdq_h + offs_m[:, None] * sdq_s + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# a handful of layouts: with pipelining several micro-batches are in flight at once
_cache = LayoutCache(layouts=8)


def _metadata(layout: torch.Tensor, blocks: "_Blocks") -> dict:
    def build():
        L = layout.shape[-1]
        meta = token_metadata(layout)
        return dict(
            piece=torch.stack([meta["pid"], meta["ppid"]], dim=1).contiguous(),  # [b, 2, L]
            fwd=query_schedule(meta, L, blocks.fwd_m, blocks.fwd_n),
            dq=query_schedule(meta, L, blocks.bwd_m, blocks.bwd_n),
            dkdv=key_schedule(meta, L, blocks.bwd_m, blocks.bwd_n),
        )

    if torch.compiler.is_compiling():
        return build()
    return _cache.get(layout, blocks, build)


# ---- launchers ----------------------------------------------------------------------------------

class _Blocks(tuple):
    """(fwd_m, fwd_n, fwd_warps, bwd_m, bwd_n, bwd_warps, stages)."""

    fwd_m = property(lambda s: s[0])
    fwd_n = property(lambda s: s[1])
    fwd_warps = property(lambda s: s[2])
    bwd_m = property(lambda s: s[3])
    bwd_n = property(lambda s: s[4])
    bwd_warps = property(lambda s: s[5])
    stages = property(lambda s: s[6])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# the largest opt-in shared memory per block of the GPUs the compile check targets: sm_90 (H100)
SM90_SHARED = 232448


def _shared_memory(device: torch.device) -> tuple[int, int]:
    """(bytes of shared memory one program may use on this device, the number Triton's launch checks;
    its compute capability's major version), which `_gpu_blocks` sizes the tiles by."""
    if not torch.cuda.is_available():  # host code asking for the GPU tile sizes (schedule tests)
        return SM90_SHARED, 9
    return _device_shared_memory(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> tuple[int, int]:
    shared = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return shared, torch.cuda.get_device_capability(index)[0]


def _shared_estimate(own: int, resident: int, piped: int, stages: int, d: int, elsize: int, extra: int = 0) -> int:
    """A program's shared memory as `resident` tiles of its own `own` rows (Q in the forward, K and V in
    the dK/dV program) plus `stages` buffered copies of the two tiles of `piped` rows it streams (K and
    V, or Q and dO), d elements of elsize bytes a row. An estimate, not a bound (Triton's metadata.shared
    of the compiled kernels): fp32 at small d needs more (128 x 64 forward tiles at d = 16: 57,856 B
    against 32,768), bf16 at large d far less (at d = 256 on sm_80: 114,944 against 196,608). The dQ
    program holds the dK/dV program's tiles the other way round (Q and dO resident, K and V streamed),
    which the sizing below does not price. Compiled for sm_80, 86, 90, 100 and 120 at every head dim in
    bf16 and fp32, every program fits its target with the tiles `_gpu_blocks` picks, the closest being
    fp32's dQ program at d = 64 on sm_86/89: 90,624 B of 101,376. `extra`: bytes a codegen adds (sm_100's
    dK/dV program, `_gpu_blocks`)."""
    return elsize * d * (resident * own + 2 * stages * piped) + extra


def _gpu_blocks(d: int, elsize: int, shared: int, major: int = 9) -> _Blocks:
    """GPU tile sizes: 128 x 64 forward tiles and 64 x 64 backward tiles (fp32 dK and dV accumulators
    of 64 x d each stay in registers with 8 warps at d = 128), halved (the larger side first, the
    streamed one on a tie) until the program fits the device's shared memory: fp32 at d = 256 would
    need 289 KB on sm_90 (227 KB there), bf16 at d = 256 161 KB on sm_86/89 (99 KB there), and the
    launch would fail with Triton's OutOfResources. On sm_100 (major 10) the dK/dV program of 16-bit
    inputs with the atomic dq also keeps that dq tile, [bwd_m, d] fp32, in shared memory (compiled: 263,200
    B at d = 256 with 64 x 64 tiles against 197,672 without the atomic dq and 132,096 on sm_90; the
    B200's limit is 232,448), so there it is priced too."""
    stages = 2 if d > 64 else 3

    def fit(own, resident, piped, dq_tile=False):
        def estimate():
            return _shared_estimate(own, resident, piped, stages, d, elsize, 4 * piped * d if dq_tile else 0)

        while estimate() > shared and max(own, piped) > 16:
            if own > piped:
                own //= 2
            else:
                piped //= 2
        return own, piped

    fwd_m, fwd_n = fit(128, 1, 64)
    bwd_n, bwd_m = fit(64, 2, 64, dq_tile=major == 10 and elsize == 2)
    return _Blocks((fwd_m, fwd_n, 8, bwd_m, bwd_n, 4 if d <= 64 else 8, stages))


def _blocks(d: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> _Blocks:
    """Tile sizes. On the GPU `_gpu_blocks` for this device's shared memory. Under the interpreter,
    16 x 16 keeps the numpy work per program small; tests patch this to choose tile alignment."""
    if device.type != "cuda":
        return _Blocks((16, 16, 4, 16, 16, 4, 1))
    return _gpu_blocks(d, dtype.itemsize, *_shared_memory(device))


def _empty(shape, device, dtype):
    """Buffers the kernels write in full (tests swap in a NaN-filled allocator to prove it)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _dot_settings(dtype: torch.dtype):
    # the interpreter's bf16 tl.dot is wrong, so every dot runs in fp32 there; on the GPU an fp32
    # dot would be TF32 by default, and fp32 inputs exist for tests, so they get IEEE products
    dot_f32 = _interpreting()
    prec = "ieee" if dtype == torch.float32 or dot_f32 else "tf32"
    return dot_f32, prec


# CUDA's largest grid y dimension, which holds the kernels' (row, head) pairs
_GRID_Y = 65535


def _check(q, k, v, layout):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"shared_prefix_attention: q [s, b, hq, d], k/v [s, b, hkv, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    s, b, hq, d = q.shape
    if k.shape[0] != s or k.shape[1] != b or k.shape[3] != d or hq % k.shape[2]:
        raise ValueError(f"shared_prefix_attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
                         f"(hq must be a multiple of hkv)")
    devices = {t.device for t in (q, k, v, layout)}
    if len(devices) > 1:  # the schedule is built on the layout's device and read by the kernels beside q
        raise ValueError(f"shared_prefix_attention: q, k, v and layout must be on one device, got q {q.device}, "
                         f"k {k.device}, v {v.device}, layout {layout.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"shared_prefix_attention: the Triton kernels take CUDA tensors (or CPU ones under "
                         f"TRITON_INTERPRET=1); q is on {q.device}")
    if layout.shape != (b, 3, s):
        raise ValueError(f"shared_prefix_attention: layout must be [b, 3, s] = [{b}, 3, {s}], "
                         f"got {tuple(layout.shape)}")
    if max(q.numel(), k.numel()) >= 2**31:  # the kernels address elements with 32-bit offsets
        raise ValueError(f"shared_prefix_attention: {tuple(q.shape)} has 2^31 or more elements; split the micro-batch")
    if b * hq > _GRID_Y:  # one (row, head) pair per grid y index
        raise ValueError(f"shared_prefix_attention: {b} rows x {hq} query heads = {b * hq} (row, head) pairs, more "
                         f"than the {_GRID_Y} one launch takes; split the micro-batch")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"shared_prefix_attention: head dim {d} is not supported (16, 32, 64, 128, 256)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"shared_prefix_attention: q, k, v must share fp16/bf16/fp32, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")


def _extent(x: torch.Tensor) -> int:
    """Elements from the first to the last one x addresses (its numel when contiguous)."""
    return 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride())) if x.numel() else 0


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels can address it, copied once where needed: stride 1 on the head dim (vector
    loads), and every offset below 2^31 (32-bit offsets). The second matters for megatron's v, a
    view into the fused QKV projection whose row stride spans all three: its offsets reach
    (G + 2) / G times its element count (G query heads per key-value head), past 2^31 while its
    element count, which _check bounds, is still below."""
    return x if x.stride(-1) == 1 and _extent(x) < 2**31 else x.contiguous()


def attention_fwd(q, k, v, layout, softmax_scale: float):
    """Launcher: -> (out [s, b, hq, d] in q's dtype, lse [b, hq, s] fp32 in base 2)."""
    _check(q, k, v, layout)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    s, b, hq, d = q.shape
    hkv = k.shape[2]
    blocks = _blocks(d, q.device, q.dtype)
    meta = _metadata(layout, blocks)
    out = _empty((s, b, hq, d), q.device, q.dtype)
    lse = _empty((b, hq, s), q.device, torch.float32)
    dot_f32, prec = _dot_settings(q.dtype)
    n_qt = triton.cdiv(s, blocks.fwd_m)
    _fwd_kernel[(n_qt, b * hq)](
        q, k, v, out, lse, meta["piece"], meta["fwd"], float(softmax_scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        s, hq, n_qt,
        GROUP=hq // hkv, D=d, BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n, DOT_F32=dot_f32, PREC=prec,
        num_warps=blocks.fwd_warps, num_stages=blocks.stages,
    )
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, layout, softmax_scale: float, deterministic: bool):
    """Launcher: -> (dq, dk, dv) shaped and typed like q, k, v."""
    q, k, v, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out)
    grad_out = _unit_last(grad_out.reshape(out.shape))
    s, b, hq, d = q.shape
    hkv = k.shape[2]
    blocks = _blocks(d, q.device, q.dtype)
    meta = _metadata(layout, blocks)
    dot_f32, prec = _dot_settings(q.dtype)
    scale = float(softmax_scale)
    delta = _empty((b, hq, s), q.device, torch.float32)
    _bwd_delta_kernel[(triton.cdiv(s, blocks.bwd_m), b * hq)](
        out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), s, hq,
        D=d, BLOCK_M=blocks.bwd_m, num_warps=4,
    )
    dk = _empty(k.shape, q.device, k.dtype)
    dv = _empty(v.shape, q.device, v.dtype)
    # the atomic path accumulates dq in fp32 from zero; the deterministic one writes every row once
    dq = _empty(q.shape, q.device, q.dtype) if deterministic else torch.zeros(q.shape, device=q.device,
                                                                              dtype=torch.float32)
    n_kt = triton.cdiv(s, blocks.bwd_n)
    _bwd_dkdv_kernel[(n_kt, b * hkv)](
        q, k, v, grad_out, lse, delta, dq, dk, dv, meta["piece"], meta["dkdv"], scale, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        s, hq, hkv, n_kt,
        GROUP=hq // hkv, D=d, BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n, ATOMIC_DQ=not deterministic,
        DOT_F32=dot_f32, PREC=prec, num_warps=blocks.bwd_warps, num_stages=blocks.stages,
    )
    if deterministic:
        n_qt = triton.cdiv(s, blocks.bwd_m)
        _bwd_dq_kernel[(n_qt, b * hq)](
            q, k, v, grad_out, lse, delta, dq, meta["piece"], meta["dq"], scale, scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            s, hq, n_qt,
            GROUP=hq // hkv, D=d, BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n, DOT_F32=dot_f32, PREC=prec,
            num_warps=blocks.bwd_warps, num_stages=blocks.stages,
        )
    else:
        dq = dq.to(q.dtype)
    return dq, dk, dv


# ---- custom ops ---------------------------------------------------------------------------------

@torch.library.custom_op("polar::shared_prefix_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor,
                  softmax_scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # `deterministic` does not change the forward; it is an input so the autograd context carries it
    return attention_fwd(q, k, v, layout, softmax_scale)


@_attention_op.register_fake
def _(q, k, v, layout, softmax_scale, deterministic):
    s, b, hq, d = q.shape
    return q.new_empty((s, b, hq, d)), q.new_empty((b, hq, s), dtype=torch.float32)


@torch.library.custom_op("polar::shared_prefix_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, layout: torch.Tensor, softmax_scale: float,
                           deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(grad_out, q, k, v, out, lse, layout, softmax_scale, deterministic)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, layout, softmax_scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, layout, softmax_scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, layout)
    ctx.softmax_scale = softmax_scale
    ctx.deterministic = deterministic


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, layout = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, layout, ctx.softmax_scale, ctx.deterministic)
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def shared_prefix_attention(q, k, v, layout, softmax_scale: float, deterministic: bool = False) -> torch.Tensor:
    """q [s, b, hq, d], k/v [s, b, hkv, d] (RoPE applied), layout int [b, 3, s] -> [s, b, hq * d].

    Differentiable. `deterministic=True` makes the backward bit-reproducible (no atomics)."""
    s, b, hq, d = q.shape
    out, _ = _attention_op(q, k, v, layout, float(softmax_scale), bool(deterministic))
    return out.view(s, b, hq * d)


def triton_backend(q, k, v, layout, softmax_scale: float) -> torch.Tensor:
    """The `train.attention_backend=triton` entry: deterministic when torch is asked to be."""
    return shared_prefix_attention(q, k, v, layout, softmax_scale, torch.are_deterministic_algorithms_enabled())


def available() -> tuple[bool, str]:
    """Whether the kernels can run here, and why not."""
    if _interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "the Triton attention needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"the Triton attention needs compute capability 8.0 or newer, found {major}.x"
    return True, "CUDA"
