"""benchmarks/fp8.py keeps running where no GPU is: its tiny CPU version (fp32 against local FP8
per tensor and per row, a few steps of the pre-training entry script) finishes, every variant
exits 0, and the JSON holds one row per variant with a throughput and a loss. Speed is not
asserted (CPU FP8 is emulated); this only keeps the script from rotting until a GPU runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_cpu_version_runs_every_variant(tmp_path):
    out = tmp_path / "fp8.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8.py"), "--cpu", "--steps", "3",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "local fp8 tensorwise", "local fp8 rowwise"]
    assert all(r["exit"] == 0 and r["tokens_per_s"] > 0 and r["loss_last10"] > 0 for r in rows), rows
    assert "| local fp8 rowwise | 0 |" in proc.stdout
    from benchmarks import plan_measured

    runs = plan_measured.measured_runs(str(out), "H100")
    assert [r["fp8"] for r in runs] == [False, True, True]
    assert [r["step_time_s"] for r in runs] == [r["step_time_s"] for r in rows]
    # without --gpu a CPU run names no GPU the plan knows: said in one line, not a traceback
    plan = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_measured.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert plan.returncode == 2 and plan.stderr.startswith("plan_measured: ValueError: device") \
        and "give --gpu" in plan.stderr and "Traceback" not in plan.stderr, plan.stderr


def test_the_gpu_type_is_read_from_the_device_name():
    from benchmarks.plan_measured import gpu_type

    assert gpu_type("NVIDIA H200") == "H200" and gpu_type("NVIDIA H100 80GB HBM3") == "H100"
    with pytest.raises(ValueError, match="give --gpu"):
        gpu_type("CPU (functional check only: FP8 is emulated)")


def test_one_logged_interval_reports_the_training_only_rate(tmp_path):
    """With one logged interval (log.interval at least the steps) there is no interval after the first,
    and the row took summary.json's tokens_per_second, over the whole fit's wall time, warm-up and final
    save included; the summary's train_tokens_per_s leaves them out, as the intervals after the first do."""
    from benchmarks import fp8

    overrides = [*fp8.CPU_SHAPE, "synthetic.train_triplets=64", "synthetic.eval_triplets=8", "train.steps=3",
                 "train.warmup_steps=1", "log.interval=3", "log.tensorboard=false", "train.eval_interval=0",
                 "train.fp8=off"]
    row = fp8.run_variant("fp32", overrides, tmp_path / "run", cuda=False, timeout=600)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert row["exit"] == 0 and len(fp8.train_rows(summary)) == 1, row
    assert summary["train_tokens_per_s"] and row["tokens_per_s"] == summary["train_tokens_per_s"], (row, summary)
