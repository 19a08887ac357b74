"""benchmarks/dataset_memory.py writes the groups it is asked for, measures both readers, and
refuses settings it cannot run."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import dataset_memory  # noqa: E402
from engine.indexed_dataset import IndexedDataset  # noqa: E402


def test_shards_hold_every_group_asked_for(tmp_path):
    idx_bytes = dataset_memory.write_shards(str(tmp_path), 1001, 3, 64)
    ds = IndexedDataset(tmp_path)
    assert ds.num_groups == 1001 and len(ds.shards) == 3
    assert idx_bytes == sum(p.stat().st_size for p in tmp_path.glob("*.idx"))


def test_a_small_run_prints_both_readers():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dataset_memory.py"), "--groups", "20000",
                          "--shards", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| read into") or line.startswith("| positional")]
    # 2 shards of 10,000 groups, 64 a sequence: 157 sequences each
    assert len(rows) == 2 and all(r.split("|")[2].strip() == "314" for r in rows), out.stdout


@pytest.mark.parametrize("args", [["--groups", "0"], ["--groups-per-sequence", "2000"], ["--groups", "3", "--shards", "4"]])
def test_bad_arguments_are_refused_without_a_traceback(args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dataset_memory.py"), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr
