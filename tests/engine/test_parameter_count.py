"""The parameter count a run reports (its log line, summary.json) is the model's at any layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import layout_count_worker

WORKER = Path(layout_count_worker.__file__)
ROOT = WORKER.parents[2]
LAYOUTS = {"tp2": ["parallel.tp=2"], "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]}


@pytest.fixture(scope="module")
def tp2_counts(tmp_path_factory) -> dict:
    """{layout: the count its trainer reports}, LAYOUTS built in turn in one launch of 2 processes."""
    tmp = tmp_path_factory.mktemp("counts")
    (tmp / "layouts.json").write_text(json.dumps(LAYOUTS))
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp / "counts.json"),
           str(tmp), str(tmp / "layouts.json")]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((tmp / "counts.json").read_text())


@pytest.fixture(scope="module")
def tp1_count(runtime, tmp_path_factory) -> int:
    """The count the same trainer reports in one process (this one's runtime: TP1, PP1)."""
    return layout_count_worker.trainer(str(tmp_path_factory.mktemp("tp1")), [], runtime).num_parameters


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_parameter_count_does_not_depend_on_tensor_parallelism(tp1_count, tp2_counts, layout):
    """The layer norms and the value head are whole on every TP rank: they were counted once per rank
    (35,264 parameters at TP1 and PP2, 35,456 at TP2)."""
    assert tp1_count > 0 and tp2_counts[layout] == tp1_count
