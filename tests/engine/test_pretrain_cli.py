"""engine/pretrain.py stops at start-up with one clear message naming the bad setting."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SMALL = ["synthetic.train_triplets=64", "synthetic.eval_triplets=16", "synthetic.prompts=50"]


def run(*args, nproc=1, tmp_path=None):
    cmd = [sys.executable, str(ROOT / "engine" / "pretrain.py"), f"run_dir={tmp_path}", *SMALL, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("args,nproc,needle", [
    (["train.bogus=1"], 1, "unknown setting 'train.bogus'"),
    (["parallel.tp=3"], 1, "world size 1 is not divisible"),
    (["parallel.tp=2"], 2, "parallel.tp=2 does not divide model.num_query_groups=1"),
    (["data.seq_length=64"], 1, "data.seq_length"),
    (["model.vocab_size=100"], 1, "model.vocab_size=100"),
])
def test_bad_input_stops_with_one_message(tmp_path, args, nproc, needle):
    if nproc > 1:
        args = [*args, "model.num_query_groups=1"]
    proc = run(*args, nproc=nproc, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("config error:") == 1, proc.stderr[-3000:]  # one message, from rank 0
    # no Python traceback from the training processes (torchrun adds its own failure summary,
    # while a worker's traceback would be printed with a "[rankN]:" prefix)
    if nproc == 1:
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:
        assert "]: Traceback" not in proc.stderr, proc.stderr[-3000:]
