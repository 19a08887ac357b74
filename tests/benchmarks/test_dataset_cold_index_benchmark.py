"""benchmarks/dataset_cold_index.py reads the same random sequences through both index sources,
the engine's bringing in only the index pages it uses, and refuses settings it cannot run."""
import pytest

from tests.benchmarks.test_dataset_cold_read_benchmark import (engine_brings_in_only_what_it_reads,
                                                               refused_without_a_traceback)


def test_a_small_run_reports_both_readers():
    engine_brings_in_only_what_it_reads("dataset_cold_index.py", "--groups", "100000", "--groups-per-sequence", "16",
                                        "--reads", "30")


@pytest.mark.parametrize("args", [["--groups", "0"], ["--groups-per-sequence", "2000"], ["--reads", "0"]])
def test_bad_arguments_are_refused_without_a_traceback(args):
    refused_without_a_traceback("dataset_cold_index.py", *args)
