import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

if not torch.cuda.is_available():  # collected only when asked for explicitly: say why nothing ran
    pytest.exit("tests/gpu needs a CUDA GPU; run it on the GPU machine (tests/gpu/run_all.sh)", returncode=1)


@pytest.fixture(scope="session")
def runtime():
    from engine.config import ParallelConfig
    from engine.runtime import init_runtime

    return init_runtime(ParallelConfig(), seed=1234)
