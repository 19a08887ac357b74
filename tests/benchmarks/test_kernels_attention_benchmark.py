"""benchmarks/kernels_attention.py --quick, as its CPU smoke test (the Triton interpreter, no GPU):
one markdown table, a row per implementation, and none of megatron's known-benign messages on
stderr. Time is not asserted."""
from tests.benchmarks.benchmark_output import markdown_tables, run_benchmark, unsilenced


def test_cpu_smoke_test_prints_a_markdown_table_without_megatron_messages():
    # the interpreter only in the child: set here it would last for every later test in this process
    proc = run_benchmark("kernels_attention.py", "--quick", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    (table,) = markdown_tables(proc.stdout)
    assert table[0] == ["shape", "impl", "time (ms)", "useful rate (TFLOP/s)", "shared/dup.", "max rel. diff", "note"]
    impls = {r[1]: r for r in table[1:]}
    assert list(impls) == ["triton", "torch_blocks", "torch_eager", "torch_compile", "flex_attention",
                           "flash_duplicated"]
    assert float(impls["triton"][2]) > 0 and impls["flex_attention"][2:] == ["-", "-", "", "", "needs CUDA"]
    # the interpreted kernel and the dense-mask SDPA were checked against torch_blocks before timing (fp32 here)
    assert float(impls["torch_blocks"][5]) == 0 and 0 <= float(impls["triton"][5]) <= 1e-5, table
    assert 0 <= float(impls["torch_eager"][5]) <= 1e-5, table
    assert unsilenced(proc.stderr) == [], proc.stderr[-3000:]
