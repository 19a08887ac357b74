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
    from engine.runtime import current_or_new_runtime

    # megatron's parallel state lives once per process: another test module may have started it
    return current_or_new_runtime(ParallelConfig(), seed=1234)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The single-process run every parity module compares against (tests/engine/parity.py), made
    once per pytest process."""
    from tests.engine.parity import make_reference

    return make_reference(tmp_path_factory.mktemp("parity"))
