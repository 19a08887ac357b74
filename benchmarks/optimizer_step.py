"""The optimizer step's three parts without Transformer Engine or Apex (this project's install), each
as megatron-core's fallback against what engine.optim runs instead:

  AdamW update   torch's AdamW as megatron builds it (foreach) | on torch's fused kernel
                 (engine.optimizer_state.use_fused_adam)
  clip scale     megatron's local_multi_tensor_scale (a Python loop, a temporary per tensor) |
                 engine.optim._foreach_scale (one in-place foreach multiply)
  gradient norm  megatron's local_multi_tensor_l2_norm (per-tensor norms through the host) |
                 engine.optim._device_l2_norm (one foreach norm, their norm on the device)

    python benchmarks/optimizer_step.py [--tensors 48] [--elements 102.8e6] [--repeats 7] [--device cpu]

Tensors of a transformer's sizes (large weight matrices among small norms and biases) summing to
--elements, fp32 as megatron's main parameters and gradients are. Each row is the median of
--repeats timed calls after a warm-up call and a counted one, the two variants alternated so that
both see the same machine load; `ops` counts the aten operators one call dispatches (a
TorchDispatchMode), the ratio column is megatron's time over ours. Before timing, each part runs once
on copies of the same inputs both ways and the results are compared (`max rel. diff`: the largest
difference over the largest magnitude, each result against its own: the update AdamW's first step
makes of each parameter and the moments it leaves, the scaled gradients, the norm); a part whose
results differ by more than 1e-5 (AdamW's updates 1e-2) is not timed and the script exits 1, so a
broken replacement cannot show as a speed-up.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import at_least  # noqa: E402
from benchmarks.compare import rel_diff  # noqa: E402


def shapes(tensors: int, elements: float) -> list:
    """Sizes like a transformer's: of every four tensors three are large matrices (1 : 2 : 3) and one a
    small vector, scaled to `elements` in all."""
    raw = [[1, 2, 3, 0.001][i % 4] for i in range(tensors)]
    unit = elements / sum(raw)
    return [max(1, int(r * unit)) for r in raw]


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def op_count(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


TOLERANCE = 1e-5  # clip scale, gradient norm: the same products and sums in fp32, rounded alike
# of an update's largest magnitude (~1.6e-4 here): the update is read as the parameter's change, whose last
# bit is that of a parameter up to ~6 (an fp32 ulp of 4.8e-7, 3e-3 of the update) where the two kernels
# round the parameter differently. No weight decay or bias correction is off by 0.3 or more.
ADAM_TOLERANCE = 1e-2


def adam(kind: str, sizes, device, weight_decay: float = 0.1, betas=(0.9, 0.95)):
    """torch's AdamW over fresh parameters and gradients, as megatron's fallback builds it (foreach:
    torch's default on these tensors) or on the fused kernel; the same values for either kind."""
    import torch

    from engine import optimizer_state

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(device)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-2
    opt = torch.optim.AdamW(params, lr=1e-4, betas=betas, eps=1e-8, weight_decay=weight_decay)

    class Wrapped:  # megatron's optimizer as use_fused_adam sees it: the torch optimizer inside
        optimizer = opt

    if kind == "fused":
        optimizer_state.use_fused_adam(Wrapped)
        assert all(grp["fused"] for grp in opt.param_groups)
    return opt


def adam_step_results(opt) -> list:
    """One step of `opt` (AdamW), and what it computed: each parameter's update (its change: the
    parameters, ~1e4 times the update, hid a missing weight decay in their last bits) and the two
    moments it leaves (a first step's update is the same for any betas)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    opt.step()
    # after - before: exact in fp32 where a step changes a parameter by less than half (Sterbenz), else within
    # an ulp of the update
    return ([p.detach() - b for p, b in zip(params, before)] + [opt.state[p]["exp_avg"] for p in params]
            + [opt.state[p]["exp_avg_sq"] for p in params])


def run(args) -> int:
    from engine.quiet import silence_known_warnings

    silence_known_warnings()
    import torch
    from megatron.core import utils

    from engine import cpu_compat
    from engine.optim import _device_l2_norm, _foreach_scale

    cpu_compat.apply()  # megatron's local norm builds its result on device="cuda"; the CPU here
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sizes = shapes(args.tensors, args.elements)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=g).to(device) for n in sizes]
    flag = torch.zeros(1, dtype=torch.int, device=device)
    theirs, ours = adam("foreach", sizes, device), adam("fused", sizes, device)

    def stepped():  # the first steps make AdamW's state (the warm-up), from the same parameters
        return adam_step_results(theirs), adam_step_results(ours)

    def scaled(scale_fn):  # the in-place clip scale on a copy of the gradients, returned
        copy = [t.clone() for t in grads]
        scale_fn(0, flag, [copy, copy], 0.5)
        return copy

    # (name, megatron's, ours, the results of both on copies of the same inputs, their tolerance)
    rows = [
        ("AdamW update", theirs.step, ours.step, stepped, ADAM_TOLERANCE),
        # a clip coefficient of 1 - 1e-7 keeps the gradients' magnitude over the repeats
        ("clip scale", lambda: utils.local_multi_tensor_scale(0, flag, [grads, grads], 1 - 1e-7),
         lambda: _foreach_scale(0, flag, [grads, grads], 1 - 1e-7),
         lambda: (scaled(utils.local_multi_tensor_scale), scaled(_foreach_scale)), TOLERANCE),
        ("gradient norm", lambda: utils.local_multi_tensor_l2_norm(0, flag, [grads], False),
         lambda: _device_l2_norm(0, flag, [grads], False),
         lambda: ([utils.local_multi_tensor_l2_norm(0, flag, [grads], False)[0].to(device)],
                  [_device_l2_norm(0, flag, [grads], False)[0]]), TOLERANCE),
    ]
    print(f"{len(sizes)} fp32 tensors, {sum(sizes) / 1e6:.1f}M elements, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats} calls")
    print("| part | megatron's fallback ms | ops | engine.optim ms | ops | ratio | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    differ = []
    for name, step_theirs, step_ours, results, tolerance in rows:
        diff = rel_diff(*results())
        if not diff <= tolerance:
            print(f"| {name} | | | | | not timed: results differ | {diff:.1e} |")
            differ.append(f"{name} (over {tolerance:g})")
            continue
        ops = (op_count(step_theirs), op_count(step_ours))
        times = ([], [])
        for _ in range(args.repeats):
            times[0].append(timed(step_theirs, sync))
            times[1].append(timed(step_ours, sync))
        t0, t1 = (statistics.median(t) * 1e3 for t in times)
        print(f"| {name} | {t0:.1f} | {ops[0]} | {t1:.1f} | {ops[1]} | {t0 / t1:.2f}x | {diff:.1e} |")
    if differ:
        print(f"results differ (relative): {', '.join(differ)}")
    return 1 if differ else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=at_least(1), default=48, help="fp32 tensors (default 48)")
    ap.add_argument("--elements", type=at_least(1, float), default=102.8e6,
                    help="their elements in all (default 102.8e6, a ~0.1B model's)")
    ap.add_argument("--repeats", type=at_least(1), default=7, help="timed calls of each part, median shown (default 7)")
    ap.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (default), or cuda on a GPU machine")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch finds no CUDA device here (torch.cuda.is_available() is false)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
