"""Resuming, with AdamW on torch's fused kernel, a checkpoint saved while it ran the foreach one (by
the code before engine.optimizer_state.use_fused_adam: users have such checkpoints). The load puts the
checkpoint's param groups in place, which name no fused kernel, and megatron restores one host `step`
shared by every parameter: the resumed run must run fused again with a float32 step of each
parameter's own, and give the uninterrupted run's losses. The uninterrupted run is the parity
reference (tests/engine/parity.py, fused throughout); steps 1 and 2 ran foreach, so the comparison
is the parity tolerance (RTOL 2e-5, ATOL 1e-6 on loss and gradient norm), which a lost step count or
moment exceeds by far (step 4's loss moves by percents), not bit equality."""
from __future__ import annotations

import shutil

import pytest

from tests.engine import parity
from tests.engine.parity import NO_END_SAVE, STEPS, assert_same_run, run_worker

WORKER = parity.WORKER.with_name("adam_kernel_worker.py")
FOREACH = {"ADAM_KERNEL": "foreach"}
LAYOUTS = {
    # megatron's distributed optimizer, its default (fully_reshardable) state format
    "distributed": (1, ()),
    # each DP rank its own shard of the state (checkpoint.optimizer_format=dp_reshardable)
    "dp2_dp_reshardable": (2, ("checkpoint.optimizer_format=dp_reshardable",)),
    # megatron's optimizer without distribution: the step comes back through the common state
    "not_distributed": (1, ("parallel.distributed_optimizer=false",)),
}


@pytest.fixture
def adam_worker(monkeypatch):
    monkeypatch.setattr(parity, "WORKER", WORKER)


def resume_a_foreach_save(tmp, init, name: str, nproc: int, *settings: str, foreach_too: bool = True):
    """A run saved at step 2 with foreach AdamW, resumed (fused) and, with `foreach_too`, from a copy
    resumed foreach as the code that saved it would: (resumed, resumed foreach or None). Asserts the
    kernel each step ran, and that every `step` counter was a float32 of its own where its kernel reads
    it (tests/engine/adam_kernel_worker.py)."""
    saved = run_worker(tmp, name, nproc, *settings, "train.exit_at_step=2", init=init, evaluate=False,
                       extra_env=FOREACH)
    assert saved["adam_fused"] == [{"fused": False, "steps_in_place": True}] * 2
    shutil.copytree(tmp / name, tmp / f"{name}_again")
    resumed = run_worker(tmp, name, nproc, *settings, "checkpoint.resume=true", NO_END_SAVE, init=init,
                         evaluate=False)
    assert resumed["adam_fused"] == [{"fused": True, "steps_in_place": True}] * (STEPS - 2)
    if not foreach_too:
        return resumed, None
    again = run_worker(tmp, f"{name}_again", nproc, *settings, "checkpoint.resume=true", NO_END_SAVE,
                       init=init, evaluate=False, extra_env=FOREACH)
    assert again["adam_fused"] == [{"fused": False, "steps_in_place": True}] * (STEPS - 2)
    return resumed, again


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_checkpoint_saved_with_foreach_adamw_resumes_fused_with_the_uninterrupted_losses(
        reference, adam_worker, layout):
    """Also against the same checkpoint resumed foreach: the fused kernel changes the update by
    reassociation only."""
    tmp, init, ref = reference
    nproc, settings = LAYOUTS[layout]
    resumed, again = resume_a_foreach_save(tmp, init, f"foreach_{layout}", nproc, *settings)
    assert_same_run(ref, resumed)
    assert_same_run(again, resumed)
