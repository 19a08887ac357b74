"""Two torchrun agents on one machine (c10d rendezvous on 127.0.0.1, one worker each), as the SLURM
launch (engine/launch/slurm_pretrain.sbatch) runs them across nodes.

One job meets two faults. First one agent's worker is killed mid-run, after a checkpoint exists: both
agents restart the worker group (--max-restarts) and the workers resume from the newest complete
checkpoint. Later a whole node is lost (an agent and its worker killed) and a replacement agent runs the
same command: it joins the surviving agent at the next rendezvous round and the group resumes again. The
job finishes with the per-step losses of the same command run without faults.

Killing torchrun's own process group would not do: the agent starts its workers in sessions of their
own, so the worker is found among the agent's descendants and killed directly.
"""
from __future__ import annotations

import json
import os
import re
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


def _store_host(agents: list, port: int):
    """The agent that hosts the rendezvous store (listens on the rendezvous port): losing it ends the job."""
    for a in agents:
        try:
            proc = psutil.Process(a.pid)
            listing = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6 names it connections
            for c in listing(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                    return a
        except psutil.NoSuchProcess:
            pass
    return None


def _checkpoint_step(run_dir: Path) -> int:
    marker = run_dir / "checkpoints" / "latest"
    try:
        return int(marker.read_text().strip().rsplit("_", 1)[1])
    except (OSError, ValueError, IndexError):
        return -1


def run_job(tmp: Path, name: str, faults: tuple = ()) -> dict:
    """Two agents of one job. Each fault (kind, step) strikes once a checkpoint of that step or later exists:
    "worker": SIGKILL one agent's worker; "node": SIGKILL an agent (not the store's host) and its worker, then
    start a replacement agent with the same command, as a scheduler would on a new node.
    Returns {"summary", "logs"}."""
    run_dir = tmp / name
    port = _free_port()
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 as in engine/launch/slurm_pretrain.sbatch: without it the restarted
    # workers hang in init_process_group (see there)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    logs = [tmp / f"{name}.agent{i}.log" for i in range(2)]

    def start(log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(_agent_cmd(port, run_dir, name), stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=tmp, start_new_session=True)

    agents = [start(log) for log in logs]
    live = list(agents)  # the job's agents now; each must end with exit code 0
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        for kind, step in faults:
            while _checkpoint_step(run_dir) < step:
                assert time.monotonic() < deadline, f"no checkpoint of step {step} was written in time"
                assert all(a.poll() is None for a in live), f"an agent ended before the checkpoint of step {step}"
                time.sleep(0.02)
            host = _store_host(live, port)
            assert host is not None, "no agent listens on the rendezvous port"
            victim = live[1] if host is live[0] else live[0]
            if kind == "worker":
                workers = _workers(victim)
                assert workers, "the agent has no worker running"
                for p in workers:
                    p.send_signal(signal.SIGKILL)
            else:
                _kill_tree(victim)
                victim.wait(timeout=60)
                logs.append(tmp / f"{name}.replacement{len(logs)}.log")
                live = [host, start(logs[-1])]
                agents.append(live[-1])
        for a in live:
            a.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: the job did not finish in {JOB_TIMEOUT_S}s:\n" + _tails(logs))
    finally:
        for a in agents:
            _kill_tree(a)
    codes = [a.returncode for a in live]
    assert codes == [0, 0], f"{name}: agents exited {codes}:\n" + _tails(logs)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"summary": summary, "logs": [log.read_text() for log in logs]}


def _tails(logs) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in logs if p.exists())


def _losses(summary: dict) -> dict:
    return {row["step"]: (row["loss"], row["grad_norm"]) for row in summary["history"]
            if "loss" in row and "eval" not in row}


def test_a_killed_worker_and_a_lost_node_end_as_if_uninterrupted(tmp_path):
    reference = run_job(tmp_path, "uninterrupted")
    # a worker killed after the checkpoint of step 2; then, after the checkpoint of step 6, a node lost (its
    # agent and worker) and a replacement agent started with the same command
    got = run_job(tmp_path, "faults", faults=(("worker", 2), ("node", 6)))

    logs = "\n".join(got["logs"])
    assert "failed (exitcode: -9)" in logs, logs[-4000:]  # the agent saw its worker killed
    # rank 0 started three times: the whole group restarted after each fault, each time from a checkpoint
    assert logs.count("run directory:") == 3, logs[-4000:]
    # the resume line may go on to name a save the lost node left unfinished
    resumed = [int(m.group(1)) for m in re.finditer(r"resumed from .* at step (\d+)", logs)]
    assert len(resumed) == 2 and 2 <= resumed[0] < 6 <= resumed[1] < STEPS, resumed

    ref, new = _losses(reference["summary"]), _losses(got["summary"])
    assert sorted(ref) == list(range(1, STEPS + 1)) and sorted(new) == sorted(ref)
    for step in ref:
        assert new[step][0] == pytest.approx(ref[step][0], rel=1e-6, abs=1e-7), f"loss at step {step}"
        assert new[step][1] == pytest.approx(ref[step][1], rel=1e-6, abs=1e-7), f"grad norm at step {step}"
    # RUN_DIR/metrics.jsonl: after both resumes each step once (the lines after the checkpoint that each
    # fault cut back to dropped), with the uninterrupted run's figures
    from engine import metrics_file

    ref_lines, new_lines = ([r for r in metrics_file.read(tmp_path / job / metrics_file.NAME) if r["kind"] == "train"]
                            for job in ("uninterrupted", "faults"))
    assert [r["step"] for r in new_lines] == [r["step"] for r in ref_lines] == list(range(1, STEPS + 1)), new_lines
    for a, b in zip(ref_lines, new_lines):
        for key in ("loss", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), f"metrics.jsonl's {key} at step {a['step']}"
    assert got["summary"]["steps"] == reference["summary"]["steps"] == STEPS
    for name, res in reference["summary"]["evaluations"].items():
        for key, value in res.items():
            assert got["summary"]["evaluations"][name][key] == pytest.approx(value, rel=1e-6), f"{name} {key}"
