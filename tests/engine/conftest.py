import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


@pytest.fixture(scope="session")
def runtime():
    """A single-process megatron runtime (gloo, TP1 PP1) shared by in-process engine tests."""
    warnings.filterwarnings("ignore")
    from engine.config import ParallelConfig
    from engine.runtime import init_runtime

    return init_runtime(ParallelConfig(), seed=1234)
