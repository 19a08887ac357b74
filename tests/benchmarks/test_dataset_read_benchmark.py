"""benchmarks/dataset_read.py reads every shard it wrote, and refuses settings it cannot run."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import dataset_read  # noqa: E402
from engine.indexed_dataset import IndexedDataset  # noqa: E402


def test_random_order_reaches_the_last_shards(tmp_path):
    dataset_read.write_shards(str(tmp_path), 3, 1, 16384)
    total = len(IndexedDataset(str(tmp_path)))
    assert total > 3, "the packer needs more than --sequences per shard here; the test relies on it"
    order = dataset_read.random_order(str(tmp_path), 2000)
    assert order.min() == 0 and order.max() == total - 1


@pytest.mark.parametrize("args", [["--shards", "0"], ["--reads", "0"], ["--seq-length", "1000"]])
def test_bad_arguments_are_refused_without_a_traceback(args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dataset_read.py"), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr
