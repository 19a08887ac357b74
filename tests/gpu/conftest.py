import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


# the files whose time is whole trainings or scorings in subprocesses, longest first: handed out before
# the kernel tests (mostly Triton compiling on the CPU), they run beside those instead of after them.
# Only under --dist loadgroup (tests/gpu/run_all.sh), which hands out one test at a time where no test
# names a group; xdist's default hands each worker a run of consecutive tests first (all these to one)
RUNS_FIRST = ("test_resume_gpu.py", "test_async_save_gpu.py", "test_score_prefetch_gpu.py",
              "test_optim_fused_gpu.py", "test_evaluation_gpu.py")


def pytest_collection_modifyitems(config, items):
    """RUNS_FIRST first under loadgroup. Without a GPU every test is collected (so a module that no
    longer imports is seen on CPU too) and skipped, saying why; with POLAR_GPU_REQUIRED set (run_all.sh)
    the session ends there, exit 3."""
    if getattr(config.option, "loadgroup", False):  # set on xdist's workers, which collect
        first = {name: i for i, name in enumerate(RUNS_FIRST)}
        items.sort(key=lambda item: first.get(item.path.name, len(first)))
    if torch.cuda.is_available():
        return
    if os.environ.get("POLAR_GPU_REQUIRED"):  # run_all.sh on the GPU machine: all skipped would read as a pass
        pytest.exit("POLAR_GPU_REQUIRED is set and torch finds no CUDA device "
                    f"(torch {torch.__version__}, CUDA {torch.version.cuda}): no test run", returncode=3)
    skip = pytest.mark.skip(reason="tests/gpu needs a CUDA GPU; run it on the GPU machine (tests/gpu/run_all.sh)")
    # the hook sees every item of the session: with other paths given beside tests/gpu, only its own
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def runtime():
    from engine.config import ParallelConfig
    from engine.runtime import init_runtime

    return init_runtime(ParallelConfig(), seed=1234)


@pytest.fixture
def report():
    """report(line): a figure a test measured, appended to $POLAR_GPU_REPORT (run_all.sh prints that
    file under its table), so a passing run still tells how close it came; nothing without it."""
    path = os.environ.get("POLAR_GPU_REPORT")

    def write(line: str) -> None:
        if path:
            with open(path, "a") as f:  # one short append per line: xdist workers share the file
                f.write(line.rstrip("\n") + "\n")

    return write
