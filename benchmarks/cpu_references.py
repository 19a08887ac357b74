"""CPU references of the fused reward readout and contrastive losses: engine._C against torch eager.

    python benchmarks/cpu_references.py [--repeat 5]

Forward + backward each, single thread (torch.set_num_threads(1); engine._C is single-threaded),
best of --repeat. Readout: hidden [s, b, h] = [8192, 2, 2048] fp32 (s*b = 16384), n = 256 reward
positions; the backward returns the full grad_hidden on both sides. Losses: n = 4096 rewards in
groups of K with one positive each, (K-1) pairs per group, pairs in shuffled order.
Only the ratio means anything across machines; these are references, not the training path.
Before timing, both sides' results (the forward's and every gradient) are compared on the same inputs:
`max rel. diff` is the largest difference over the largest magnitude of torch's, each result against
its own; a case over 1e-4 is not timed and the script exits 1, so a wrong reference cannot show as a
speed-up.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.compare import rel_diff  # noqa: E402
from engine import _C  # noqa: E402
from engine.loss import infonce_sums, pairwise_sums  # noqa: E402
from engine.model.readout import torch_reward_readout  # noqa: E402


TOLERANCE = 1e-4  # fp32 on both sides (engine._C sums in double): rounding stays far below


def compared(name, run_torch, run_cpp, repeat):
    """(name, torch seconds, C++ seconds, max rel. diff): both run once and their results compared
    (which warms them up too); the times are None where the results differ beyond TOLERANCE."""
    diff = rel_diff(run_torch(), run_cpp())
    if not diff <= TOLERANCE:
        return name, None, None, diff
    return name, best_of(run_torch, repeat), best_of(run_cpp, repeat), diff


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
        rewards = torch_reward_readout(th, ti, tn, tw, eps)
        rewards.backward(tg)
        return [rewards.detach().numpy(), th.grad.numpy(), tn.grad.numpy(), tw.grad.numpy()]

    def run_cpp():
        rewards = _C.readout_forward(hidden, index, norm_w, head_w, eps)
        return [rewards, *_C.readout_backward(hidden, index, norm_w, head_w, eps, grad_r)]

    return compared(f"readout h={h} n={n} s*b={s * b}", run_torch, run_cpp, repeat)


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
        loss = ref(tr, tp, tn)[0]
        loss.backward()
        return [loss.detach().numpy(), tr.grad.numpy()]

    def run_cpp():
        loss, _, grad = cpp(rewards, pos, neg)
        return [loss, grad]

    return compared(f"{kind} n={n} K={k} pairs={pos.size}", run_torch, run_cpp, repeat)


def cases(repeat) -> list:
    """Every case's (name, torch seconds, C++ seconds, max rel. diff), single-threaded."""
    torch.set_num_threads(1)
    rows = [readout_case(repeat)]
    for kind in ("pairwise", "infonce"):
        for k in (2, 8):
            rows.append(loss_case(kind, k, repeat))
    return rows


def print_table(rows, repeat) -> int:
    """The markdown table; 1 where a case's results differ (not timed), else 0."""
    print(f"CPU references: torch {torch.__version__}, 1 thread, forward+backward, best of {repeat}\n")
    print("| case | torch eager (ms) | engine._C (ms) | torch / C++ | max rel. diff |")
    print("|---|---:|---:|---:|---:|")
    for name, t_torch, t_cpp, diff in rows:
        if t_torch is None:
            print(f"| {name} | | | not timed: results differ | {diff:.1e} |")
        else:
            print(f"| {name} | {t_torch * 1e3:.3f} | {t_cpp * 1e3:.3f} | {t_torch / t_cpp:.2f}x | {diff:.1e} |")
    differ = [r[0] for r in rows if r[1] is None]
    if differ:
        print(f"\nresults differ beyond {TOLERANCE:g} (relative): {', '.join(differ)}")
    return 1 if differ else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=at_least(1), default=5, help="timed runs of each side, the best kept (default 5)")
    args = ap.parse_args(argv)
    return print_table(cases(args.repeat), args.repeat)


if __name__ == "__main__":
    sys.exit(main())
