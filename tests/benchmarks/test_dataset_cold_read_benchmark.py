"""benchmarks/dataset_cold_read.py reads the same random sequences through both token sources and
refuses settings it cannot run."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READERS = {"positional reads (engine)", "memory map (before)"}


def engine_brings_in_only_what_it_reads(script: str, *args: str) -> None:
    """A small run of `script` prints a row for each reader, and the engine's brings into the page
    cache at most what its reads need (one partial page more at each end of each read at most)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r[0]: r for r in ([c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines()
                              if line.startswith("| positional") or line.startswith("| memory"))}
    assert set(rows) == READERS, out.stdout
    engine = rows["positional reads (engine)"]
    if "cannot be measured" not in engine[1]:  # a file system that ignores DONTNEED (tmpfs) keeps pages
        assert float(engine[2].rstrip("x")) <= 1.05, out.stdout


def refused_without_a_traceback(script: str, *args: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr


def test_a_small_run_reports_both_readers():
    engine_brings_in_only_what_it_reads("dataset_cold_read.py", "--sequences", "300", "--seq-length", "4096",
                                        "--reads", "20")


@pytest.mark.parametrize("args", [["--sequences", "0"], ["--seq-length", "8"], ["--reads", "0"]])
def test_bad_arguments_are_refused_without_a_traceback(args):
    refused_without_a_traceback("dataset_cold_read.py", *args)
