"""benchmarks/shared_prefix.py --no-time: one markdown table, a row per K and layout, and none of
megatron's known-benign messages on stderr."""
from tests.benchmarks.benchmark_output import markdown_tables, run_benchmark, unsilenced


def test_counts_print_a_markdown_table_without_megatron_messages():
    proc = run_benchmark("shared_prefix.py", "--no-time", "--groups", "4")  # K 2 and 8
    (table,) = markdown_tables(proc.stdout)
    assert table[0][:3] == ["K", "layout", "tokens"] and table[0][-2] == "fwd+bwd s"
    assert [r[:2] for r in table[1:]] == [["2", "shared"], ["2", "duplicated"], ["8", "shared"], ["8", "duplicated"]]
    assert table[2][-1] == "1.00x, 1.00x, 1.00x, -" and all(r[-2] == "-" for r in table[1:])
    assert unsilenced(proc.stderr) == [], proc.stderr[-3000:]
