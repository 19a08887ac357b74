"""Resuming, with AdamW on torch's fused kernel, a checkpoint saved while it ran the foreach one (by
the code before engine.optimizer_state.use_fused_adam: users have such checkpoints). The load puts the
checkpoint's param groups in place, which name no fused kernel, and megatron restores one host `step`
shared by every parameter: the resumed run must run fused again with a float32 step of each
parameter's own, and give the uninterrupted run's losses. The uninterrupted run is the parity
reference (tests/engine/parity.py, fused throughout); steps 1 and 2 ran foreach, so the comparison
is the parity tolerance (RTOL 2e-5, ATOL 1e-6 on loss and gradient norm), which a lost step count or
moment exceeds by far (step 4's loss moves by percents), not bit equality.

Three ways the state comes back, each checked once: megatron's optimizer without distribution (here),
the distributed optimizer's default fully_reshardable state (the TP2 save resumed at TP1) and its
dp_reshardable one at DP2 (the DP2 save resumed at DP2 and DP1), the last two inside the runs of
tests/engine/test_parallel_resume.py, which save with foreach AdamW (tests/engine/runs_worker.py's
worker "adam", ADAM_KERNEL=foreach) and check the resumes with assert_kernel."""
from __future__ import annotations

import shutil

import pytest

from tests.engine import parity
from tests.engine.parity import NO_END_SAVE, STEPS, assert_same_run, run_worker

WORKER = parity.WORKER.with_name("adam_kernel_worker.py")


def adam_run(tmp, name: str, nproc: int, *overrides: str, foreach: bool = False, **kwargs):
    """run_worker through tests/engine/adam_kernel_worker.py, which records the AdamW kernel of each
    step (`adam_fused`); with `foreach`, AdamW runs the foreach kernel, as the code before
    use_fused_adam chose it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parity, "WORKER", WORKER)
        return run_worker(tmp, name, nproc, *overrides, extra_env={"ADAM_KERNEL": "foreach"} if foreach else None,
                          **kwargs)


def assert_kernel(result: dict, fused: bool, steps: int) -> None:
    """Every one of the run's `steps` optimizer steps ran the kernel, and every `step` counter was a
    float32 of its own where that kernel reads it (tests/engine/adam_kernel_worker.py)."""
    assert result["adam_fused"] == [{"fused": fused, "steps_in_place": True}] * steps


def foreach_run(tmp, name: str, nproc: int, *overrides: str, **kwargs):
    """A run that trains (and saves) with foreach AdamW, checked to have run it."""
    saved = adam_run(tmp, name, nproc, *overrides, foreach=True, evaluate=False, **kwargs)
    assert_kernel(saved, False, len(saved["history"]))
    return saved


def test_a_checkpoint_saved_with_foreach_adamw_resumes_fused_with_the_uninterrupted_losses(reference):
    """megatron's optimizer without distribution: the step comes back through the common state. Also
    against the same checkpoint resumed foreach, as on a device without the fused kernel (the step
    copies after_load makes are then host tensors): the fused kernel changes the update by
    reassociation only."""
    tmp, init, ref = reference
    name, settings = "foreach_not_distributed", ("parallel.distributed_optimizer=false",)
    foreach_run(tmp, name, 1, *settings, "train.exit_at_step=2", init=init)
    shutil.copytree(tmp / name, tmp / f"{name}_again")
    resume = (*settings, "checkpoint.resume=true", NO_END_SAVE)
    resumed = adam_run(tmp, name, 1, *resume, init=init, evaluate=False)
    assert_kernel(resumed, True, STEPS - 2)
    again = adam_run(tmp, f"{name}_again", 1, *resume, foreach=True, init=init, evaluate=False)
    assert_kernel(again, False, STEPS - 2)
    assert_same_run(ref, resumed)
    assert_same_run(again, resumed)
