"""benchmarks/checkpoint_fsync.py at its smallest: one markdown table, a row per mode, whose fsync
counts are what each mode means: a durable save fsyncs every file of its step but megatron's shards
(megatron fsyncs them as it writes them), the step directory,
the checkpoint directory after the rename, and `latest` (its temporary file, then the directory
again) on top of the shards megatron fsyncs itself; no fsync at all in the last."""
import re

from tests.benchmarks.benchmark_output import markdown_tables, run_benchmark, unsilenced


def test_one_markdown_table_whose_fsyncs_are_each_modes():
    proc = run_benchmark("checkpoint_fsync.py", "--repeats", "1", OMP_NUM_THREADS="1")
    (table,) = markdown_tables(proc.stdout)
    assert table[0] == ["saves", "fsyncs a save", "save() ms", "vs megatron's fsyncs only", "vs no fsync"]
    assert [r[0] for r in table[1:]] == ["durable", "megatron's fsyncs only", "no fsync"], table
    files, shards = map(int, re.search(r"in (\d+) files \((\d+) shards", proc.stdout).groups())
    durable, megatron, none = (int(r[1]) for r in table[1:])
    assert megatron >= shards > 0 and none == 0 and durable == megatron + files - shards + 4, (files, table)
    assert table[2][3] == "1.00x" and table[3][4] == "1.00x", table
    assert unsilenced(proc.stderr) == [], proc.stderr[-3000:]


def test_a_missing_dir_is_named_not_a_traceback(tmp_path):
    import subprocess
    import sys

    from tests.benchmarks.benchmark_output import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_fsync.py"), "--dir",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"--dir {tmp_path / 'nope'}: not a directory" in proc.stderr, proc.stderr
