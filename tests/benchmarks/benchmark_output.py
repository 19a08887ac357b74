"""What the benchmark tests read of a script's output: its markdown tables (README: scripts under
`benchmarks/` print markdown tables), and a run in a process of its own, whose stderr shows whether
megatron's known-benign messages (engine/quiet.py) were silenced before megatron was imported."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALIGNMENT = re.compile(r"\|(:?-{3,}:?\|)+")
# one of engine/quiet.py's log records and one of its warnings: what these scripts printed unsilenced
SILENCED = ("GPTModel IS DEPRECATED", "Transformer Engine and Apex are not installed")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Each block of lines starting with '|' as a table's rows of cells, the header first and the
    alignment row left out; a block that is not a markdown table fails."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            tables.append(_cells(block))
            block = []
    return tables


def _cells(lines: list[str]) -> list[list[str]]:
    assert len(lines) >= 2 and ALIGNMENT.fullmatch(lines[1]), lines[:2]
    width = lines[1].count("|") - 1
    rows = [[c.strip() for c in line[1:-1].split("|")] for line in [lines[0], *lines[2:]]]
    assert all(line.endswith("|") for line in lines) and all(len(r) == width for r in rows), lines
    return rows


def run_benchmark(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """benchmarks/<script> with `args`, extra `env`, and the silencing on (as a user runs it)."""
    environ = {k: v for k, v in os.environ.items() if k != "POLAR_SHOW_ALL_WARNINGS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**environ, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def unsilenced(stderr: str) -> list[str]:
    return [m for m in SILENCED if m in stderr]
