"""CPU references of the fused reward readout and contrastive losses: engine._C against torch eager.

    python benchmarks/cpu_references.py [--repeat 5]

Forward + backward each, single thread (torch.set_num_threads(1); engine._C is single-threaded),
best of --repeat. Readout: hidden [s, b, h] = [8192, 2, 2048] fp32 (s*b = 16384), n = 256 reward
positions; the backward returns the full grad_hidden on both sides. Losses: n = 4096 rewards in
groups of K with one positive each, (K-1) pairs per group, pairs in shuffled order.
Only the ratio means anything across machines; these are references, not the training path.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.arguments import at_least  # noqa: E402
from engine import _C  # noqa: E402
from engine.loss import infonce_sums, pairwise_sums  # noqa: E402
from engine.model.readout import torch_reward_readout  # noqa: E402


def best_of(fn, repeat):
    fn()  # warm-up (allocator, first-call costs)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def readout_case(repeat, s=8192, b=2, h=2048, n=256, eps=1e-6):
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((s, b, h), dtype=np.float32)
    index = rng.choice(s * b, size=n, replace=False).astype(np.int64)
    norm_w = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    head_w = (rng.standard_normal(h) / np.sqrt(h)).astype(np.float32)
    grad_r = np.ones(n, np.float32)

    th = torch.from_numpy(hidden).requires_grad_()
    tn = torch.from_numpy(norm_w).requires_grad_()
    tw = torch.from_numpy(head_w).requires_grad_()
    ti, tg = torch.from_numpy(index), torch.from_numpy(grad_r)

    def run_torch():
        th.grad = tn.grad = tw.grad = None
        torch_reward_readout(th, ti, tn, tw, eps).backward(tg)

    def run_cpp():
        _C.readout_forward(hidden, index, norm_w, head_w, eps)
        _C.readout_backward(hidden, index, norm_w, head_w, eps, grad_r)

    return f"readout h={h} n={n} s*b={s * b}", best_of(run_torch, repeat), best_of(run_cpp, repeat)


def loss_case(kind, k, repeat, n=4096):
    rng = np.random.default_rng(k)
    rewards = rng.standard_normal(n).astype(np.float32)
    groups = n // k
    pos = np.repeat(np.arange(groups) * k, k - 1)
    neg = (np.arange(groups)[:, None] * k + np.arange(1, k)[None, :]).reshape(-1)
    order = rng.permutation(pos.size)
    pos, neg = pos[order].astype(np.int64), neg[order].astype(np.int64)
    ref, cpp = {"pairwise": (pairwise_sums, _C.pairwise_loss), "infonce": (infonce_sums, _C.infonce_loss)}[kind]
    tr = torch.from_numpy(rewards).requires_grad_()
    tp, tn = torch.from_numpy(pos), torch.from_numpy(neg)

    def run_torch():
        tr.grad = None
        ref(tr, tp, tn)[0].backward()

    return f"{kind} n={n} K={k} pairs={pos.size}", best_of(run_torch, repeat), best_of(lambda: cpp(rewards, pos, neg), repeat)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=at_least(1), default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [readout_case(args.repeat)]
    for kind in ("pairwise", "infonce"):
        for k in (2, 8):
            rows.append(loss_case(kind, k, args.repeat))
    print(f"torch {torch.__version__}, 1 thread, forward+backward, best of {args.repeat}\n")
    print("| case | torch eager (ms) | engine._C (ms) | torch / C++ |")
    print("|---|---:|---:|---:|")
    for name, t_torch, t_cpp in rows:
        print(f"| {name} | {t_torch * 1e3:.3f} | {t_cpp * 1e3:.3f} | {t_torch / t_cpp:.2f}x |")


if __name__ == "__main__":
    main()
