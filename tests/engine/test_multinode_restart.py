"""Two torchrun agents on one machine (c10d rendezvous on 127.0.0.1, one worker each), as the SLURM
launch (engine/launch/slurm_pretrain.sbatch) runs them across nodes.

One agent's worker is killed mid-run, after a checkpoint exists. Both agents restart the worker group
(--max-restarts), the workers resume from the newest complete checkpoint, and the job finishes with the
per-step losses of the same command run without the kill.

Killing torchrun's own process group would not do: the agent starts its workers in sessions of their
own, so the worker is found among the agent's descendants and killed directly.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "engine" / "pretrain.py"
STEPS = 12
TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=1",
    "model.ffn_hidden_size=64", f"train.steps={STEPS}", "train.global_batch=4", "synthetic.train_triplets=200",
    "synthetic.eval_triplets=20", "synthetic.prompts=50", "checkpoint.save_interval=2", "log.interval=1",
    "log.tensorboard=false", "train.time_limit_s=0", "data.seq_length=512",
    "train.warmup_steps=1",  # the loss moves within the 12 steps, so equal losses say something
]
JOB_TIMEOUT_S = 420  # per job; a hung rendezvous or collective fails the test instead of the CI run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_cmd(port: int, run_dir: Path, job: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job,
        "--local-addr", "127.0.0.1",
        "--max-restarts", "2", "--monitor-interval", "0.1",
        str(ENTRY), *TINY, f"run_dir={run_dir}",
    ]


def _kill_tree(proc: subprocess.Popen) -> None:
    """The agent and every process below it (workers live in sessions of their own)."""
    try:
        procs = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _workers(agent: subprocess.Popen) -> list:
    try:
        kids = psutil.Process(agent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in kids:
        try:
            if str(ENTRY) in p.cmdline():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def run_job(tmp: Path, name: str, kill_after_checkpoint: bool) -> dict:
    """Two agents of one job; returns {"summary", "logs", "killed_at"}."""
    run_dir = tmp / name
    port = _free_port()
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 as in engine/launch/slurm_pretrain.sbatch: without it the restarted
    # workers hang in init_process_group (see there)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    logs = [tmp / f"{name}.agent{i}.log" for i in range(2)]
    agents = []
    for i in range(2):
        with open(logs[i], "w") as out:
            agents.append(subprocess.Popen(_agent_cmd(port, run_dir, name), stdout=out, stderr=subprocess.STDOUT,
                                           env=env, cwd=tmp, start_new_session=True))
    killed_at = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        if kill_after_checkpoint:
            marker = run_dir / "checkpoints" / "latest"
            while not marker.exists():
                assert time.monotonic() < deadline, "no checkpoint was written in time"
                assert all(a.poll() is None for a in agents), "an agent ended before the first checkpoint"
                time.sleep(0.02)
            victims = _workers(agents[1])
            assert victims, "agent 1 has no worker running"
            killed_at = marker.read_text().strip()
            for p in victims:
                p.send_signal(signal.SIGKILL)
        for a in agents:
            a.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: the job did not finish in {JOB_TIMEOUT_S}s:\n" + _tails(logs))
    finally:
        for a in agents:
            _kill_tree(a)
    text = [log.read_text() for log in logs]
    assert [a.returncode for a in agents] == [0, 0], f"{name}: agents exited {[a.returncode for a in agents]}:\n" \
                                                     + _tails(logs)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"summary": summary, "logs": text, "killed_at": killed_at}


def _tails(logs) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in logs if p.exists())


def _losses(summary: dict) -> dict:
    return {row["step"]: (row["loss"], row["grad_norm"]) for row in summary["history"]
            if "loss" in row and "eval" not in row}


def test_a_killed_worker_restarts_the_group_and_the_run_ends_as_if_uninterrupted(tmp_path):
    reference = run_job(tmp_path, "uninterrupted", kill_after_checkpoint=False)
    killed = run_job(tmp_path, "killed", kill_after_checkpoint=True)

    # the kill really interrupted the run: the group restarted and resumed from a checkpoint mid-run
    logs = "\n".join(killed["logs"])
    resumed = [line for line in logs.splitlines() if "resumed from" in line]
    assert resumed, "no worker resumed from a checkpoint:\n" + logs[-4000:]
    resumed_step = int(resumed[-1].rsplit("at step", 1)[1])
    assert 2 <= resumed_step < STEPS, resumed
    assert "failed (exitcode: -9)" in logs, logs[-4000:]  # the agent saw its worker killed
    assert logs.count("run directory:") == 2, logs[-4000:]  # rank 0 started twice: the whole group restarted

    ref, got = _losses(reference["summary"]), _losses(killed["summary"])
    assert sorted(ref) == list(range(1, STEPS + 1)) and sorted(got) == sorted(ref)
    for step in ref:
        assert got[step][0] == pytest.approx(ref[step][0], rel=1e-6, abs=1e-7), f"loss at step {step}"
        assert got[step][1] == pytest.approx(ref[step][1], rel=1e-6, abs=1e-7), f"grad norm at step {step}"
    assert killed["summary"]["steps"] == reference["summary"]["steps"] == STEPS
    for name, res in reference["summary"]["evaluations"].items():
        for key, value in res.items():
            assert killed["summary"]["evaluations"][name][key] == pytest.approx(value, rel=1e-6), f"{name} {key}"
