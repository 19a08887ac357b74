"""engine/quiet.py: megatron's CUDA_DEVICE_MAX_CONNECTIONS hint is silenced on CPU runs, and shown
again with POLAR_SHOW_ALL_WARNINGS=1. Every TP > 1 run on CPU (`polar score --tp 2`, `parallel.tp=2`)
printed it once per rank, although a CPU has no CUDA streams to order."""
import warnings

import pytest

from engine import quiet

HINTS = ["When using async grad allreduce it is recommended to set the environment variable "
         "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup",
         "When using sequence parallelism it is recommended to set the environment variable "
         "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup"]


@pytest.mark.parametrize("show_all,shown", [(None, 0), ("1", 2)])
def test_cuda_stream_hints_are_silenced_on_cpu(monkeypatch, show_all, shown):
    if show_all is None:
        monkeypatch.delenv("POLAR_SHOW_ALL_WARNINGS", raising=False)
    else:
        monkeypatch.setenv("POLAR_SHOW_ALL_WARNINGS", show_all)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.silence_cpu_warnings()
        for hint in HINTS:
            warnings.warn(hint, UserWarning)
        warnings.warn("another UserWarning still prints", UserWarning)
    assert [str(w.message) for w in seen] == HINTS[:shown] + ["another UserWarning still prints"]
