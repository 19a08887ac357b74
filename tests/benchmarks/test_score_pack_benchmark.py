"""benchmarks/score_pack.py: polar score's chunk packing in input order against best fit, and its mapping of
rewards back to the groups before and now, as tables (speed is not asserted)."""
from tests.benchmarks.benchmark_output import markdown_tables, run_benchmark


def test_tables_set_best_fit_against_input_order_and_the_mapping_against_the_old_one():
    proc = run_benchmark("score_pack.py", "--chunks", "2", "--chunk-groups", "300", "--groups", "500")
    packing, mapping = markdown_tables(proc.stdout)
    assert packing[0][:4] == ["lengths", "chunks x groups", "rows, input order", "rows, best fit"]
    assert [r[0] for r in packing[1:]] == ["log-normal, median 1,500", "uniform 100-6,000"]
    for row in packing[1:]:
        assert row[1] == "2 x 300" and int(row[3]) <= int(row[2]) and row[6].endswith("x"), row
    assert mapping[0][0] == "groups x candidates" and mapping[1][0] == "500 x 8" and mapping[1][3].endswith("x")
