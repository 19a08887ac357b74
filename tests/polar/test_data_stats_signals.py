"""`polar data stats --workers N` stopped by a signal to its main process alone (`kill PID`, an
orchestrator's terminate(), SIGKILL): its spawned workers, each holding its own call queue's pipe
open, waited for work for good with the multiprocessing resource tracker beside them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.polar.test_data_build import ROOT, SEQ, synthetic_records, write_jsonl
from tests.polar.test_data_build_signals import alive_after_killing, end


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    src = write_jsonl(tmp / "r.jsonl", synthetic_records(40))
    for i in range(2):
        subprocess.run([sys.executable, "-m", "polar.cli", "data", "build", str(src), "-o", str(tmp / "ds"),
                        "--seq-length", str(SEQ), "--num-shards", "2", "--shard-index", str(i), "--quiet"],
                       check=True, capture_output=True, timeout=300, cwd=ROOT)
    return tmp / "ds"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_workers_of_a_stats_pass_end_with_its_main_process(tmp_path, dataset, sig):
    stuck = tmp_path / "stuck"
    script = ("import sys\n"
              "from polar import data_stats\n"
              "from tests.polar.stats_stuck_worker import stuck\n"
              "data_stats.shard_summary = stuck\n"
              "if __name__ == '__main__':\n"
              "    sys.exit(data_stats.main(sys.argv[1:]))\n")
    (tmp_path / "stats.py").write_text(script)
    with open(tmp_path / "stderr", "w") as err:  # workers left behind would hold a pipe open
        proc = subprocess.Popen([sys.executable, str(tmp_path / "stats.py"), str(dataset), "--workers", "2"],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                                env=dict(os.environ, POLAR_TEST_STUCK=str(stuck), PYTHONPATH=str(ROOT)))
    children = []
    try:
        deadline = time.monotonic() + 120
        while not stuck.exists():
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
            assert time.monotonic() < deadline, "no worker reached its shard"
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children()  # the workers and the resource tracker
        assert not alive_after_killing(proc, children, sig), children
    finally:
        end(proc, children)
