"""benchmarks/dataset_open.py opens the same shards as version 2 and as version 1, and refuses
settings it cannot run."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_a_small_run_opens_both_versions_of_the_same_shards():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dataset_open.py"), "--groups", "20000",
                          "--groups-per-sequence", "4", "--repeats", "1", "--reads", "50"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith("| 4 |")]
    assert [r[1] for r in rows] == ["version 1", "version 2"], out.stdout
    assert rows[0][2] == rows[1][2] == "5,000"  # 20,000 groups, 4 a sequence
    # version 2 is the same index plus 6 int64 counts a sequence (and up to 7 bytes of padding)
    extra = (float(rows[1][3]) - float(rows[0][3])) * 2**20
    assert abs(extra - 5000 * 48) < 0.1 * 2**20, rows


@pytest.mark.parametrize("args", [["--groups", "0"], ["--groups-per-sequence", "2000"], ["--groups", "3", "--shards", "4"],
                                  ["--reads", "0"]])
def test_bad_arguments_are_refused_without_a_traceback(args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dataset_open.py"), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr
