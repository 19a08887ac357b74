"""`polar pretrain` is the process a scheduler signals (a container's first process, `kill` of the
command a user started): a SIGTERM it receives must reach torchrun, whose workers then save the step
they reached and stop (engine/trainer.py). It killed `polar` alone, and torchrun trained on."""
import json
import os
import signal
import subprocess
import sys

import psutil

from engine.stop_signal import EXIT_SIGTERM


def test_sigterm_to_polar_pretrain_reaches_the_run_which_saves_and_stops(tmp_path):
    cmd = [sys.executable, "-m", "polar.cli", "pretrain", "--nproc", "1", f"run_dir={tmp_path / 'run'}",
           "train.steps=1000", "synthetic.train_triplets=64", "synthetic.eval_triplets=16", "synthetic.prompts=50",
           "log.interval=1", "train.global_batch=2"]  # steps of 2 sequences, not 16: the stop is checked, not the step
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    lines, family = [], []
    try:
        for line in proc.stdout:  # the worker's "training N parameters ..." comes once fit has started
            lines.append(line)
            if line.startswith("training "):
                family = psutil.Process(proc.pid).children(recursive=True)
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=300)
    finally:
        for p in [psutil.Process(proc.pid)] if proc.poll() is None else []:
            family += p.children(recursive=True)
        for p in family + ([proc] if proc.poll() is None else []):
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
    out = "".join(lines) + out
    assert family, out[-3000:]
    assert "stopped for SIGTERM at step" in out, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM", summary
    # torchrun, signalled itself, exits 1 once its worker has saved; polar says the run was stopped by the signal
    assert proc.returncode == EXIT_SIGTERM, out[-3000:]
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], family
