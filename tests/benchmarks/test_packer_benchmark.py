"""benchmarks/packer.py separates the language's speed-up (C++ against Python running the same
algorithm on the same groups) from the ratio against the naive Python first-fit, which mixes
algorithm and language and holds only at the group count it states. Speed is not asserted."""
import numpy as np
import pytest

from engine import _C
from tests.benchmarks.benchmark_output import markdown_tables, run_benchmark


@pytest.mark.parametrize("seed", range(4))
def test_python_best_fit_is_the_cpp_algorithm(seed):
    """The like-for-like row times a Python best-fit that packs exactly as engine._C does, ties included."""
    from benchmarks.packer import python_best_fit

    rng = np.random.default_rng(seed)
    capacity = [16, 100, 4096, 16384][seed]
    lengths = rng.integers(1, max(2, capacity // (4 if seed % 2 else 1)) + 1, size=int(rng.integers(1, 2000)))
    assert python_best_fit(lengths.tolist(), capacity) == _C.pack_best_fit(lengths, capacity).tolist()


def test_tables_set_each_packer_against_its_own_algorithm_and_first_fit_at_a_stated_count():
    proc = run_benchmark("packer.py", "--groups", "3000", "--python-groups", "1000")
    same, first_fit = markdown_tables(proc.stdout)
    assert same[0] == ["algorithm", "groups", "Python groups/s", "C++ groups/s", "C++ / Python", "sequences",
                       "efficiency"]
    assert [r[0] for r in same[1:]] == ["next-fit (order kept)", "best-fit decreasing"]
    assert all(r[1] == "3000" and r[4].endswith("x") for r in same[1:])
    assert first_fit[0][3] == "vs Python first-fit at 1000 groups"
    assert [r[0] for r in first_fit[1:]] == ["Python first-fit (baseline)", "C++ next-fit (order kept)",
                                             "C++ best-fit decreasing"]
    assert all(r[1] == "1000" for r in first_fit[1:])  # every rate of that table at the count it states
    assert "algorithm and language together" in proc.stdout
