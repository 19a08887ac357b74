"""benchmarks/checkpoint_async.py at its smallest: one markdown table, a row per save mode, and none of
megatron's known-benign messages on stderr (megatron's "MCore's async save is deprecated" came once per
background save's first plan, and its model messages at start, before the script silenced them)."""
from tests.benchmarks.benchmark_output import markdown_tables, run_benchmark, unsilenced


def test_one_markdown_table_without_megatron_messages():
    proc = run_benchmark("checkpoint_async.py", "--hidden", "64", "--layers", "1", "--steps", "1", "--repeats", "1",
                         OMP_NUM_THREADS="1")
    (table,) = markdown_tables(proc.stdout)
    assert table[0] == ["async_save", "save() ms", "step ms", "no save", "waited ms", "stopped ms", "vs sync"]
    assert [r[0] for r in table[1:]] == ["false", "true"] and table[1][-1] == "1.00x", table
    assert unsilenced(proc.stderr) == [] and "MCore's async save is deprecated" not in proc.stderr, proc.stderr[-3000:]
