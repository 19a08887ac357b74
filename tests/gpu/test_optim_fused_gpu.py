"""A checkpoint saved while AdamW ran torch's foreach kernel (the code before
engine.optimizer_state.use_fused_adam) resumed on the fused one on a GPU, where it matters where the
`step` counters are: megatron restores one host tensor, the foreach kernel reads it there and the
fused one only from the parameter's device. In bf16 (train.precision=auto on a GPU: the distributed
optimizer's fp32 main parameters on the GPU) and the default checkpoint.optimizer_format; the harness
and its checks are tests/engine/test_optim_fused_resume.py's, which also resumes dp_reshardable and
the plain optimizer's state on the CPU. Three runs: the reference, the foreach save, the fused resume."""
import pytest

from tests.engine import parity
from tests.engine.parity import make_reference, by_step
from tests.engine.test_optim_fused_resume import WORKER, resume_a_foreach_save

# as tests/gpu/test_resume_gpu.py: a lost optimizer state moves step 4's loss by percents
RTOL = 2e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted bf16 run (fused throughout) and its initial weights."""
    return make_reference(tmp_path_factory.mktemp("fused_resume_gpu"))


def test_a_foreach_checkpoint_resumes_fused_with_the_uninterrupted_losses(reference, monkeypatch):
    tmp, init, ref = reference
    monkeypatch.setattr(parity, "WORKER", WORKER)
    resumed, _ = resume_a_foreach_save(tmp, init, "foreach", 1, foreach_too=False)
    r, g = by_step(ref), by_step(resumed)
    for step in (3, 4):
        assert g[step]["loss"] == pytest.approx(r[step]["loss"], rel=RTOL), (step, r[step], g[step])
