"""Resuming on a GPU in bf16, where the distributed optimizer's fp32 main parameters are tensors of
their own (on CPU in fp32 they are the model's parameters): a run saved at step 2 in each
checkpoint.optimizer_format and resumed gives the uninterrupted run's losses at steps 3 and 4 (both
depend on the restored Adam moments and step count). The same harness as tests/engine/parity.py,
one process on the GPU over NCCL."""
import pytest

from tests.engine.parity import make_reference, run_worker, by_step

# bf16 kernels give the same result for the same inputs on one card; a lost optimizer state (moments or
# step count) moves step 4's loss by percents (seen on CPU: 4%)
RTOL = 2e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Initial weights and the uninterrupted run from them, shared by the formats on a worker."""
    return make_reference(tmp_path_factory.mktemp("resume_gpu"))


@pytest.mark.parametrize("fmt", ["fully_reshardable", "dp_reshardable"])
def test_bf16_resume_gives_the_uninterrupted_losses(reference, fmt):
    tmp, init, ref = reference
    setting = f"checkpoint.optimizer_format={fmt}"
    run_worker(tmp, f"resume_{fmt}", 1, setting, "train.exit_at_step=2", init=init)
    resumed = run_worker(tmp, f"resume_{fmt}", 1, setting, "checkpoint.resume=true", init=init)
    r, g = by_step(ref), by_step(resumed)
    for step in (3, 4):
        assert g[step]["loss"] == pytest.approx(r[step]["loss"], rel=RTOL), (fmt, step, r[step], g[step])
