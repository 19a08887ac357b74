"""Benchmarks that time the pre-training entry script: one subprocess per run, read back through
its summary.json (benchmarks/fp8.py, benchmarks/e2e.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_logged(cmd: list[str], timeout: int) -> tuple[int, str, float]:
    """(exit code, the last 2000 characters of its output, wall seconds); 124 when it timed out.
    The checkout's packages come first on its path."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out[-2000:], time.time() - t0
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        return 124, "timed out", time.time() - t0


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kills a run and every process under it. torchrun's workers outlive a killed torchrun, and
    one left holding the GPU would slow every run after it."""
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.kill()
    proc.communicate()
    psutil.wait_procs(procs, timeout=30)


def run_pretrain(overrides: list[str], run_dir: Path, cuda: bool, timeout: int) -> tuple[int, str, float, dict | None]:
    """engine/pretrain.py with `overrides` into `run_dir` (torchrun, one process, on a GPU; a plain
    process on CPU) -> (exit code, output tail, wall seconds, its summary.json or None)."""
    script = str(ROOT / "engine" / "pretrain.py")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script] if cuda
           else [sys.executable, script])
    rc, tail, wall = run_logged(cmd + [*overrides, f"run_dir={run_dir}"], timeout)
    summary = run_dir / "summary.json"
    if rc != 0 or not summary.exists():
        return rc, tail, wall, None
    return rc, tail, wall, json.loads(summary.read_text())


def train_rows(summary: dict) -> list[dict]:
    """The logged training intervals of a summary's history (evaluation rows left out)."""
    return [r for r in summary["history"] if "loss" in r and "eval" not in r]
