"""The parameter count a run reports (its log line, summary.json) is the model's at any layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("layout_count_worker.py")
ROOT = WORKER.parents[2]


def _count(tmp_path, name, nproc, *overrides):
    out = tmp_path / f"{name}.json"
    cmd = [str(WORKER), str(out), str(tmp_path / name), *overrides]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, *cmd], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())["parameters"]


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.tp=2", "parallel.sequence_parallel=true"]])
def test_the_parameter_count_does_not_depend_on_tensor_parallelism(tmp_path, layout):
    """The layer norms and the value head are whole on every TP rank: they were counted once per rank
    (35,264 parameters at TP1 and PP2, 35,456 at TP2)."""
    one = _count(tmp_path, "tp1", 1)
    assert one > 0 and _count(tmp_path, "tp2", 2, *layout) == one
