"""Shared-prefix attention, forward + backward, against the other ways to compute it.

At POLAR-like shapes (hidden 2048 = 16 x 128 and 4096 = 32 x 128 query heads, 8 KV heads; packed
sequences of 512 to 16k tokens holding groups of one prefix, 3 parts in 3 + K, and K candidates of one
part each; about 16k tokens per batch) it times, on one CUDA GPU:

    triton               engine.kernels.shared_prefix_attention (the `train.attention_backend=triton` kernel)
    torch_blocks         SDPA once per group (the `blocks` backend, the CPU default)
    torch_eager          dense-mask SDPA, the torch backend's math (skipped where the mask does not fit)
    torch_compile        torch.compile of torch_eager
    flex_attention       torch.nn.attention.flex_attention with a block mask built from the layout
    flash_duplicated     SDPA's flash backend, causal, on the duplicated layout (each candidate as its own
                         prefix + candidate sequence: what trainers without shared-prefix packing run)

Every row's tflops counts the shared mask's useful FLOPs (`attention_flops`: 4 d pairs hq forward, 2.5x
that backward), whatever the implementation computes, so rows of one shape compare directly; the
triton row carries `shared_over_duplicated` (its time over flash_duplicated's, below 1 = shared wins).
Before timing, every implementation of the shared mask runs once on the same q, k, v and upstream
gradient and its output and q, k, v gradients at the real (not padding) tokens are compared with
torch_blocks' (`max rel. diff`: the largest difference over the largest magnitude of torch_blocks',
each result against its own); one off by more than 5% is not timed (its row says so) and the script
exits 1, so a broken kernel cannot show as fast. flash_duplicated computes another layout from inputs of its own: not compared.

`run(peaks, quick)` is called by benchmarks/kernels.py with peaks {"bf16_tflops", "copy_gbps"} measured
on the card. Without CUDA it returns rows saying "needs CUDA"; with quick=True and TRITON_INTERPRET=1
set before anything imported triton, it runs the triton and eager rows at a tiny shape on CPU as a
smoke test of this script (timings meaningless there, and said so).

    python benchmarks/kernels_attention.py [--quick]
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare import BF16_TOLERANCE, rel_diff  # noqa: E402

KERNEL = "shared_prefix_attention"
GROUP_TOKENS = 4096  # longest group; longer sequences hold several
BATCH_TOKENS = 16384
DENSE_MASK_BYTES = 8 << 30  # eager and compile materialise [b, 1, L, L] masks and their bf16 bias


def _layout(L: int, k: int, b: int, device):
    """b rows of L tokens, each holding groups of prefix 3 parts and k candidates of one part."""
    from engine.packing import Group, collate
    import numpy as np

    n_groups = max(1, L // GROUP_TOKENS)
    glen = L // n_groups
    part = glen // (3 + k)
    prefix = glen - k * part
    labels = np.array([1] + [0] * (k - 1), dtype=np.int8)
    g = Group(np.ones(prefix, np.int32), [np.ones(part, np.int32) for _ in range(k)], labels)
    layout = collate([[g] * n_groups for _ in range(b)], L, pad_id=0).layout.to(device)
    return layout, n_groups, prefix, part


def _timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn, grads: do_bench(fn, warmup=25, rep=100, grad_to_none=grads)

    def cpu_time(fn, grads):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return cpu_time


REFERENCE = "torch_blocks"
TOLERANCE = BF16_TOLERANCE


def _fwd_bwd(fn, inputs, grad):
    def step():
        out = fn(*inputs)
        out.backward(grad)
    return step


def _results(fn, inputs, grad, real, seq_first):
    """fn's output and its inputs' gradients for the upstream `grad`, each as [s, b, heads, d] (`seq_first`
    False: from [b, heads, s, d]), at the real tokens only (`real`: bool [b, s])."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(grad)
    got = [out.detach(), *(t.grad for t in inputs)]
    b, s = real.shape
    d = inputs[0].shape[-1]
    canon = [g.reshape(s, b, -1, d) if seq_first else g.permute(2, 0, 1, 3) for g in got]
    return [g[real.t()] for g in canon]


def _impls(layout, q, k, v, scale, device, quick):
    """name -> (callable on its own tensors, its inputs, grad shape) or a reason string it cannot run."""
    from engine.kernels.shared_prefix_attention import shared_prefix_attention
    from engine.packing import dense_mask

    s, b, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    from engine.model.shared_prefix_attention import blocked_shared_prefix_attention

    impls = {"triton": (lambda q, k, v: shared_prefix_attention(q, k, v, layout, scale), (q, k, v), (s, b, hq * d)),
             "torch_blocks": (lambda q, k, v: blocked_shared_prefix_attention(q, k, v, layout, scale), (q, k, v),
                              (s, b, hq * d))}
    qb, kb, vb = (t.detach().permute(1, 2, 0, 3).contiguous().requires_grad_() for t in (q, k, v))

    mask_bytes = b * s * s * 3
    if mask_bytes > DENSE_MASK_BYTES:
        impls["torch_eager"] = impls["torch_compile"] = (f"skipped: a dense [b, 1, L, L] mask needs "
                                                         f"{mask_bytes / 2**30:.0f} GiB")
    else:
        mask = dense_mask(layout).unsqueeze(1)

        def eager(q, k, v):
            # expanded KV heads keep SDPA on its memory-efficient kernel (GQA would send a masked call to math)
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

        impls["torch_eager"] = (eager, (qb, kb, vb), (b, hq, s, d))
        impls["torch_compile"] = ((torch.compile(eager), (qb, kb, vb), (b, hq, s, d)) if device.type == "cuda"
                                  else "needs CUDA")

    if device.type != "cuda":
        impls["flex_attention"] = impls["flash_duplicated"] = "needs CUDA"
        return impls

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seg, cand = layout[:, 1].long(), layout[:, 2].long()

    def mask_mod(bi, h, qi, kj):
        same = (seg[bi, qi] == seg[bi, kj]) & (seg[bi, kj] >= 0) & (kj <= qi)
        return (same & ((cand[bi, kj] == 0) | (cand[bi, kj] == cand[bi, qi]))) | (qi == kj)

    block_mask = create_block_mask(mask_mod, b, None, s, s, device=device)
    flex = torch.compile(flex_attention)
    impls["flex_attention"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True),
                               (qb, kb, vb), (b, hq, s, d))
    return impls


def _duplicated(n_seqs, prefix, part, hq, hkv, d, dtype, device, scale):
    """The same groups with each candidate as its own causal prefix + candidate sequence, flash SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = prefix + part
    mk = lambda h: torch.randn(n_seqs, h, n, d, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = mk(hq), mk(hkv), mk(hkv)

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            except RuntimeError:  # a torch whose flash backend lacks GQA: expand the KV heads
                g = q.shape[1] // k.shape[1]
                return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                      is_causal=True, scale=scale)

    return flash, (q, k, v), (n_seqs, hq, n, d)


def _row(shape, impl, ms, flops, peaks, **extra):
    tflops = flops / ms / 1e9 if ms else None
    peak = peaks.get("bf16_tflops")
    return dict(kernel=KERNEL, shape=shape, impl=impl, ms=ms, tflops=tflops,
                frac_peak=tflops / peak if tflops and peak else None, **extra)


def _shapes(quick: bool, device):
    if device.type != "cuda":
        return [(2, 1, 32, 1, 2, 128)]  # hq, hkv, d, b, K, L: a smoke test of the script on CPU
    heads = [(16, 8, 128), (32, 8, 128)]
    lengths = [2048, 8192] if quick else [512, 2048, 8192, 16384]
    return [(hq, hkv, d, max(1, BATCH_TOKENS // L), k, L) for hq, hkv, d in heads for L in lengths for k in (2, 8)]


def run(peaks: dict, quick: bool) -> list[dict]:
    cuda = torch.cuda.is_available()
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not cuda and not (quick and interpreting):
        return [dict(kernel=KERNEL, shape="-", impl="all", ms=None, tflops=None, frac_peak=None,
                     note="needs CUDA (quick=True with TRITON_INTERPRET=1 runs a CPU smoke test of the script)")]
    from engine.kernels.attention_schedule import attention_flops

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = _timer(device)
    rows = []
    for hq, hkv, d, b, k, L in _shapes(quick, device):
        layout, n_groups, prefix, part = _layout(L, k, b, device)
        shape = f"hq{hq}xd{d} kv{hkv} L{L} b{b} K{k} prefix{prefix} cand{part}"
        flops = attention_flops(layout, hq, d)
        scale = d ** -0.5
        q = torch.randn(L, b, hq, d, device=device, dtype=dtype, requires_grad=True)
        kk = torch.randn(L, b, hkv, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(L, b, hkv, d, device=device, dtype=dtype, requires_grad=True)
        impls = _impls(layout, q, kk, v, scale, device, quick)
        if cuda:
            impls["flash_duplicated"] = _duplicated(b * n_groups * k, prefix, part, hq, hkv, d, dtype, device, scale)
        # one upstream gradient for every implementation of the shared mask, in each one's layout
        grad_out = torch.randn(L, b, hq, d, device=device, dtype=dtype)
        real = layout[:, 1] >= 0
        try:
            want = _results(*impls[REFERENCE][:2], grad_out.view(L, b, hq * d), real, True)
        except Exception as exc:  # nothing to compare with: no row of this shape is timed
            rows += [_row(shape, name, None, flops, peaks, note=f"not timed: {REFERENCE}, the reference, failed: "
                          f"{type(exc).__name__}: {exc}"[:300]) for name in impls]
            continue
        times = {}
        for name, impl in impls.items():
            if isinstance(impl, str):
                rows.append(_row(shape, name, None, flops, peaks, note=impl))
                continue
            fn, inputs, grad_shape = impl
            try:
                diff = None
                if name == "flash_duplicated":  # its own layout and inputs
                    grad = torch.randn(grad_shape, device=device, dtype=dtype)
                else:
                    seq_first = grad_shape[0] == L  # [s, b, hq * d], else [b, hq, s, d]
                    grad = grad_out.view(grad_shape) if seq_first else grad_out.permute(1, 2, 0, 3).contiguous()
                    diff = rel_diff(want, _results(fn, inputs, grad, real, seq_first))
                    if not diff <= TOLERANCE:
                        rows.append(_row(shape, name, None, flops, peaks, max_rel_diff=diff,
                                         note=f"not timed: results differ from {REFERENCE}'s by {diff:.1e}"))
                        continue
                times[name] = timer(_fwd_bwd(fn, inputs, grad), list(inputs))
                note = "" if cuda else "CPU smoke test (Triton interpreter): timing meaningless"
                rows.append(_row(shape, name, times[name], flops, peaks, max_rel_diff=diff, note=note))
            except torch.cuda.OutOfMemoryError:
                rows.append(_row(shape, name, None, flops, peaks, note="skipped: out of GPU memory"))
                torch.cuda.empty_cache()
            except Exception as exc:  # a failing comparison must not hide the others: report it in its row
                rows.append(_row(shape, name, None, flops, peaks, note=f"failed: {type(exc).__name__}: {exc}"[:300]))
        if "triton" in times and "flash_duplicated" in times:
            rows[-len(impls)]["shared_over_duplicated"] = times["triton"] / times["flash_duplicated"]
        del q, kk, v, impls
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (with TRITON_INTERPRET=1 and no GPU: "
                    "a CPU smoke test of the script)")
    quick = ap.parse_args(argv).quick  # --help and unknown arguments used to run the benchmark
    from engine.quiet import silence_known_warnings

    silence_known_warnings()  # before run() imports megatron: some of its warnings come at import
    peaks = {}
    if torch.cuda.is_available():  # fractions of the card's own measured peak, never a quoted one
        from kernels import measure_peaks

        peaks = measure_peaks()
    print(f"| {'shape':<48} | {'impl':<18} | {'time (ms)':>9} | {'useful rate (TFLOP/s)':>21} | {'shared/dup.':>11} "
          "| max rel. diff | note |")
    print("|---|---|---:|---:|---:|---:|---|")
    rows = run(peaks, quick)
    for row in rows:
        ms = f"{row['ms']:.3f}" if row["ms"] else "-"
        tf = f"{row['tflops']:.1f}" if row["tflops"] else "-"
        ratio = f"{row['shared_over_duplicated']:.2f}" if "shared_over_duplicated" in row else ""
        diff = f"{row['max_rel_diff']:.1e}" if row.get("max_rel_diff") is not None else ""
        print(f"| {row['shape']:<48} | {row['impl']:<18} | {ms:>9} | {tf:>21} | {ratio:>11} | {diff:>13} "
              f"| {row.get('note', '')} |")
    differ = [f"{r['shape']} {r['impl']}" for r in rows if r.get("note", "").startswith("not timed: results differ")]
    if differ:
        print(f"results differ beyond {TOLERANCE:g} (relative) from {REFERENCE}'s: {'; '.join(differ)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
