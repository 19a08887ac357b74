"""engine.evaluation.evaluate on a CUDA GPU: the batches its read-ahead thread collates reach the schedule
page-locked (so PackedBatch.to's non_blocking copies are asynchronous), the thread works on the rank's
device (a thread left on device 0 would give every rank of a node a CUDA context on GPU 0), and the
statistics are those of the evaluation without the thread, bf16 kernels and all. On CPU
(tests/engine/test_evaluation_read_ahead.py) nothing is pinned; there the statistics, the stops and the
thread's end are checked at one process and at DP2 x PP2. One GPU: one process."""
from tests.engine.test_evaluation_read_ahead import _run


def test_read_ahead_batches_are_pinned_on_the_ranks_device_with_the_same_statistics(tmp_path):
    (rank,) = _run(tmp_path, 1)
    assert rank["device"].startswith("cuda"), rank
    index = int(rank["device"].partition(":")[2] or 0)
    assert rank["ahead"] == rank["in_line"] and rank["ahead"]["pair_accuracy"] not in (0, 0.5, 1), rank
    assert rank["ahead_threads"] == ["eval-read-ahead_0"] and rank["in_line_threads"] == ["MainThread"], rank
    assert rank["ahead_pinned"] == rank["in_line_pinned"] == [True], rank
    assert rank["ahead_devices"] == rank["in_line_devices"] == [index], rank
    assert rank["stopped"][:2] == ["SIGTERM", 2], rank
    for way in ("ahead", "stopped", "read_error", "check_error"):
        assert rank[f"{way}_left"] == [], (way, rank)
