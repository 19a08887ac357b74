"""benchmarks/serve_grouping.py: a markdown table, a row per --items. Time is not asserted."""
from benchmarks import serve_grouping as bench  # the repository root is on the path: tests/ is a package
from tests.benchmarks.benchmark_output import markdown_tables


def test_smallest_run_prints_a_markdown_row_per_size(capsys):
    bench.main(["--items", "16", "64", "--repeats", "1"])
    (table,) = markdown_tables(capsys.readouterr().out)
    assert table[0] == ["items", "groups", "seconds (best of 1)", "us/item"]
    assert [r[:2] for r in table[1:]] == [["16", "1"], ["64", "1"]]  # one prompt: its rollouts in one group
