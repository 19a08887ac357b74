"""A checkpoint saved while AdamW ran torch's foreach kernel (the code before
engine.optimizer_state.use_fused_adam) resumed on the fused one on a GPU, where it matters where the
`step` counters are: megatron restores one host tensor, the foreach kernel reads it there and the
fused one only from the parameter's device. In bf16 (train.precision=auto on a GPU: the distributed
optimizer's fp32 main parameters on the GPU) and the default checkpoint.optimizer_format; the harness
and its checks are tests/engine/test_optim_fused_resume.py's, which resumes the plain optimizer's state
on the CPU (tests/engine/test_parallel_resume.py the distributed optimizer's, TP2 -> TP1 and
dp_reshardable at DP2 -> DP2, DP1). Three runs: the reference, the foreach save, the fused resume."""
import pytest

from tests.engine.parity import NO_END_SAVE, STEPS, by_step, make_reference
from tests.engine.test_optim_fused_resume import adam_run, assert_kernel, foreach_run

# as tests/gpu/test_resume_gpu.py: a lost optimizer state moves step 4's loss by percents
RTOL = 2e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted bf16 run (fused throughout) and its initial weights."""
    return make_reference(tmp_path_factory.mktemp("fused_resume_gpu"))


def test_a_foreach_checkpoint_resumes_fused_with_the_uninterrupted_losses(reference):
    tmp, init, ref = reference
    foreach_run(tmp, "foreach", 1, "train.exit_at_step=2", init=init)
    resumed = adam_run(tmp, "foreach", 1, "checkpoint.resume=true", NO_END_SAVE, init=init, evaluate=False)
    assert_kernel(resumed, True, STEPS - 2)
    r, g = by_step(ref), by_step(resumed)
    for step in (3, 4):
        assert g[step]["loss"] == pytest.approx(r[step]["loss"], rel=RTOL), (step, r[step], g[step])
