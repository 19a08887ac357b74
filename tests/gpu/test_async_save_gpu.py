"""checkpoint.async_save=true on a CUDA GPU, one process over NCCL. What the GPU adds to the CPU tests
(tests/engine/test_checkpoint_async.py, gloo: parity at DP2 and TP2, a failing writer, a kill): the
snapshot is megatron's device-to-host copy into pinned host memory, made in save(), and the writer is a
process forked by a process that has initialised CUDA (megatron's TemporalAsyncCaller), which must
neither touch CUDA nor read host memory the fork did not carry, and must not outlive the run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from engine.checkpoint import STATE_FILE
from tests.engine.parity import COMMON, NO_END_SAVE, ROOT, by_step, run_worker
from tests.engine.test_checkpoint_async import (ASYNC, SAVES, _loaded, _rolled_back, _run_scenario, _running,
                                               _untimed)

WORKER = Path(__file__).with_name("save_twice_worker.py")
# as tests/gpu/test_resume_gpu.py: a resumed bf16 run on one card differs from the uninterrupted one by
# the order of its atomics only; a lost optimizer state moves step 4's loss by percents
RTOL = 2e-3
STEPS = ("step_00000002", "step_00000004")


MARK = "POLAR_GPU_TEST_RUN"  # set to a new value for each run: its forked children inherit it


def _left_behind(token: str) -> list:
    """Processes still running (after 5 s) whose environment holds MARK=token. They are killed, so
    that a failure leaves nothing behind either."""
    needle = f"{MARK}={token}".encode()
    for _ in range(50):
        left = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                found = needle in proc.joinpath("environ").read_bytes().split(b"\0")
            except OSError:  # gone, or not ours
                continue
            if found and _running(int(proc.name)):
                left.append(int(proc.name))
        if not left:
            return []
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def test_a_background_save_on_cuda_writes_a_synchronous_ones_files_resumes_and_leaves_no_process(tmp_path):
    """A 4-step run saving at steps 2 and 4, each save made twice of the same state (save_twice_worker.py):
    synchronously, then in the background while the next steps train. Every file is byte for byte the
    synchronous save's but torch's .metadata, which names its directory (read back: every tensor and
    object equal), and the trainer state, which names its save (save_id, f9bd6dc: compared without it, as
    the CPU test does); a run resumed from the background save at step 2 trains steps 3-4 as the run did; and
    neither run leaves a process behind (the writers, megatron's results server)."""
    token = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", POLAR_SYNC_COPY=str(tmp_path / "sync"),
               **{MARK: token})
    out, log = tmp_path / "run.json", tmp_path / "run.log"
    cmd = [sys.executable, str(WORKER), "--out", str(out), "--no-eval", f"run_dir={tmp_path / 'run'}", *COMMON,
           *SAVES, ASYNC]
    with open(log, "w") as f:  # a file, not a pipe: a process left behind would hold a pipe open
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    left = _left_behind(token)
    assert proc.returncode == 0 and out.exists(), log.read_text()[-6000:]
    assert not left, f"still running after the run ended: {left}"
    run = json.loads(out.read_text())

    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == (tmp_path / "sync" / "latest").read_text() == STEPS[-1]
    for step in STEPS:
        want, got = tmp_path / "sync" / step, ckpts / step
        names = sorted(p.name for p in want.iterdir())
        assert sorted(p.name for p in got.iterdir()) == names and any(n.endswith(".distcp") for n in names), step
        differ = [n for n in names if n not in (".metadata", STATE_FILE)
                  and (want / n).read_bytes() != (got / n).read_bytes()]
        assert not differ, f"{step}: {differ} differ from the synchronous save's"
        assert _untimed(want) == _untimed(got), step
        a, b = _loaded(want, tmp_path), _loaded(got, tmp_path)
        assert sorted(a) == sorted(b) and any(k.startswith("optimizer.") for k in a), sorted(a)[:20]
        for key, value in a.items():
            same = torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]
            assert same, f"{step}: {key}"

    _rolled_back(tmp_path / "run", STEPS[0], tmp_path / "at2")
    token = uuid.uuid4().hex
    resumed = run_worker(tmp_path, "at2", 1, "checkpoint.resume=true", *SAVES, ASYNC, NO_END_SAVE,
                         evaluate=False, extra_env={MARK: token})
    assert not _left_behind(token), "still running after the resumed run ended"
    r, g = by_step(run), by_step(resumed)
    for step in (3, 4):
        assert abs(g[step]["loss"] - r[step]["loss"]) <= RTOL * abs(r[step]["loss"]), (step, r[step], g[step])
    assert (tmp_path / "at2" / "checkpoints" / "latest").read_text() == STEPS[-1]  # its own background save


def test_values_changed_on_the_gpu_after_a_background_save_returns_are_not_in_it(tmp_path):
    """The CPU test's scenario on the GPU: one step, a background save whose writer is held back while
    every weight, main weight and Adam moment is changed in place on the device; the save, finished and
    loaded back, holds the values of the save (the host copy was complete when save() returned)."""
    (rank,) = _run_scenario(tmp_path, "snapshot", 1)
    assert rank["pending_after_save"] and rank["complete"] and rank["tensors"] > 0, rank
    assert rank["changed"] == 0, rank
