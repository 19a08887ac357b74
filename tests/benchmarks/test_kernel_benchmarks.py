"""The kernel benchmarks compare each implementation's results with its reference's on the same
inputs before timing it: a kernel that computes something else is reported, not timed, so it cannot
show as a speed-up. Time is not asserted."""
import sys

import torch

from tests.benchmarks.benchmark_output import ROOT, markdown_tables, run_benchmark


def test_a_readout_whose_results_differ_is_not_timed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernels import bench_rows

    from engine.model.readout import torch_reward_readout

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 1, 32, generator=gen).requires_grad_()
    w = torch.ones(32, requires_grad=True)
    v = torch.randn(1, 32, generator=gen).requires_grad_()
    index = torch.tensor([3, 17, 40, 63])

    def step(fn):
        hidden.grad = w.grad = v.grad = None
        rewards = fn(hidden, index, w, v, 1e-6)
        rewards.backward(torch.ones(4))
        return [rewards, hidden.grad, w.grad, v.grad]

    def off_by_a_tenth(*args):  # right gradients' shape, wrong values: what a broken kernel looks like
        return torch_reward_readout(*args) * 1.1

    timed = []
    impls = {"cuda": "unavailable: no GPU", "off": off_by_a_tenth, "torch eager": torch_reward_readout}
    rows = bench_rows("readout fwd+bwd", "tiny", impls, step, 1, {"copy_gbps": 1.0},
                      timer=lambda fn: timed.append(fn) or 1.0)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["cuda"]["error"] == "unavailable: no GPU"
    assert "ms" not in by_impl["off"] and by_impl["off"]["error"].startswith("not timed: results differ")
    assert abs(by_impl["off"]["max_rel_diff"] - 0.1) < 0.01
    assert by_impl["torch eager"]["max_rel_diff"] == 0 and by_impl["torch eager"]["ratio"] == 1.0
    assert len(timed) == 1  # only torch eager was timed


def test_optimizer_step_compares_each_part_before_timing_it():
    proc = run_benchmark("optimizer_step.py", "--tensors", "8", "--elements", "1e4", "--repeats", "1",
                         CUDA_VISIBLE_DEVICES="")
    (table,) = markdown_tables(proc.stdout)
    assert table[0][-1] == "max rel. diff" and [r[0] for r in table[1:]] == ["AdamW update", "clip scale",
                                                                            "gradient norm"]
    assert all(0 <= float(r[-1]) <= 1e-5 and r[5].endswith("x") for r in table[1:]), table


def test_swiglu_memory_compares_fused_with_unfused():
    proc = run_benchmark("swiglu_memory.py", "--shapes", "32x64x64", "--repeats", "1", CUDA_VISIBLE_DEVICES="")
    (table,) = markdown_tables(proc.stdout)
    assert table[0][-1] == "max rel. diff" and 0 <= float(table[1][-1]) <= 1e-4, table
