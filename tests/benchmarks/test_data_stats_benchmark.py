"""benchmarks/data_stats.py: both ways to the statistics give the same figures, and settings it
cannot run are refused."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_a_small_run_gives_the_same_figures_both_ways():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_stats.py"), "--groups", "30000",
                          "--shards", "3", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
            if line.startswith("| every") or line.startswith("| per-shard")]
    assert [r[0] for r in rows] == ["every length (before)", "per-shard length counts (engine)"], out.stdout
    assert all(r[-1] == "yes" for r in rows), out.stdout


@pytest.mark.parametrize("args", [["--groups", "0"], ["--groups-per-sequence", "2000"],
                                  ["--groups", "3", "--shards", "4"], ["--workers", "0"]])
def test_bad_arguments_are_refused_without_a_traceback(args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_stats.py"), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr
