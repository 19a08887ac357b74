"""benchmarks/score_chunks.py: its input is what polar score reads, and bad settings are refused."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import score_chunks  # noqa: E402
from polar.score_input import survey_score_input  # noqa: E402


def test_the_input_is_read_by_polar_score_line_for_line(tmp_path):
    path = str(tmp_path / "in.jsonl")
    score_chunks.write_input(path, 30)
    numbers, bad, _ = survey_score_input(path)
    assert list(numbers) == list(range(1, 31)) and bad == 0


@pytest.mark.parametrize("args", [["--lines", "0"], ["--chunk-lines", "0"], ["--chunk-lines", "x"]])
def test_bad_arguments_are_refused_without_a_traceback(args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_chunks.py"), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr
