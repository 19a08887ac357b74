"""The kernel benchmarks compare each implementation's results with its reference's on the same
inputs before timing it: a kernel that computes something else is reported, not timed, so it cannot
show as a speed-up. Time is not asserted."""
import sys

import torch

from tests.benchmarks.benchmark_output import ROOT, markdown_tables, run_benchmark


def _readout_step(h: int):
    """kernels.py's readout step (forward, backward; the rewards and every gradient) at 64 tokens of hidden h."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 1, h, generator=gen).requires_grad_()
    w = torch.ones(h, requires_grad=True)
    v = torch.randn(1, h, generator=gen).requires_grad_()
    index = torch.tensor([3, 17, 40, 63])

    def step(fn):
        hidden.grad = w.grad = v.grad = None
        rewards = fn(hidden, index, w, v, 1e-6)
        rewards.backward(torch.ones(4))
        return [rewards, hidden.grad, w.grad, v.grad]
    return step


def test_a_readout_whose_results_differ_is_not_timed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernels import bench_rows

    from engine.model.readout import torch_reward_readout

    step = _readout_step(32)

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


def test_a_wrong_gradient_is_not_hidden_by_a_larger_result():
    # each result is measured against its own magnitude: over the largest of all of them (the rewards, a sum over
    # the hidden size, ~30x the hidden gradient here) a kernel whose hidden gradient was half of torch's passed
    # the 5% check and was timed
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import rel_diff
    from kernels import TOLERANCE, bench_rows

    from engine.model.readout import torch_reward_readout

    step = _readout_step(1024)

    def half_hidden_gradient(hidden, *args):  # the same rewards; the gradient reaching `hidden` halved
        return torch_reward_readout(hidden * 0.5 + (hidden * 0.5).detach(), *args)

    rows = bench_rows("readout fwd+bwd", "tiny", {"half": half_hidden_gradient, "torch eager": torch_reward_readout},
                      step, 1, {"copy_gbps": 1.0}, timer=lambda fn: 1.0)
    half = rows[0]
    assert abs(half["max_rel_diff"] - 0.5) < 1e-6 and half["error"].startswith("not timed: results differ"), half
    assert rel_diff([torch.tensor([100.0]), torch.tensor([1.0, -2.0])],
                    [torch.tensor([100.0]), torch.tensor([1.0, -1.0])]) == 0.5 > TOLERANCE
    # a result all zero in the reference: the bare difference
    assert rel_diff([torch.zeros(3)], [torch.tensor([0.0, 0.25, 0.0])]) == 0.25
    # a NaN in any result but the first was dropped by max(): a kernel with a NaN gradient passed
    nan = rel_diff([torch.ones(2), torch.ones(2)], [torch.ones(2), torch.tensor([1.0, float("nan")])])
    assert not nan <= TOLERANCE


def test_an_adamw_step_without_weight_decay_or_bias_correction_is_not_timed():
    # the parameters (magnitude ~5) were compared, not the update one step makes of them (~1e-4): an AdamW with
    # no weight decay differed from torch's by 1e-5 of the parameters and passed the 1e-5 check
    sys.path.insert(0, str(ROOT))
    from benchmarks.compare import rel_diff
    from benchmarks.optimizer_step import ADAM_TOLERANCE, adam, adam_step_results, shapes

    sizes, cpu = shapes(8, 2e5), torch.device("cpu")
    reference = adam_step_results(adam("foreach", sizes, cpu))
    assert rel_diff(reference, adam_step_results(adam("fused", sizes, cpu))) <= ADAM_TOLERANCE
    assert rel_diff(reference, adam_step_results(adam("foreach", sizes, cpu, weight_decay=0.0))) > ADAM_TOLERANCE
    # the moments too: a first step's update is the same for any betas (bias-corrected)
    assert rel_diff(reference, adam_step_results(adam("foreach", sizes, cpu, betas=(0.8, 0.95)))) > ADAM_TOLERANCE
