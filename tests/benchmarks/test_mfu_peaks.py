"""MFU against both peaks in benchmarks/e2e.py and benchmarks/plan_measured.py: the card's measured
GEMM peak (what the training line divides by) and its datasheet dense peak, the conventional figure
issue 10's ">= 45% bf16 MFU" is read against; the output says which one the target uses."""
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from tests.benchmarks.benchmark_output import markdown_tables

ROOT = Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"  # what torch.cuda.get_device_name() says on an H100 SXM


def test_datasheet_peaks_tell_the_h100_variants_apart():
    from benchmarks.datasheet_peaks import datasheet_mfu, datasheet_peak

    assert datasheet_peak(H100)[:2] == (989.5, 1979.0)
    assert datasheet_peak("NVIDIA H100 PCIe")[:2] == (756.5, 1513.0)  # not the SXM's 989.5
    assert datasheet_peak("NVIDIA H100 NVL")[:2] == (835.5, 1670.5)
    assert datasheet_peak("NVIDIA A100-SXM4-80GB")[:2] == (312.0, None)
    assert datasheet_peak("CPU") is None and datasheet_mfu(100.0, "CPU") is None
    assert datasheet_mfu(445.275, H100) == pytest.approx(0.45)
    assert datasheet_mfu(989.5, H100, fp8=True) == pytest.approx(0.5)
    assert datasheet_mfu(100.0, "NVIDIA A100-SXM4-80GB", fp8=True) is None  # no fp8 tensor cores
    assert datasheet_mfu(float("nan"), H100) is None


def test_e2e_table_has_both_mfu_columns_and_names_the_targets_peak():
    from benchmarks import e2e

    row = e2e.with_datasheet_mfu({"shape": "~1B", "trainer": "engine", "exit": 0, "triplets_per_step": 8.0,
                                  "triplets_per_s": 10.0, "tokens_per_s_processed": 1e5, "tokens_per_s_real": 9e4,
                                  "tflops_per_s": 445.275, "mfu": 0.55, "loss": 0.69}, H100)
    out = io.StringIO()
    with redirect_stdout(out):
        e2e.print_table("header", [row], [])
    header, cells = markdown_tables(out.getvalue())[0][:2]
    by_name = dict(zip(header, cells))
    assert by_name["MFU vs measured peak"] == "55.0%" and by_name["MFU vs datasheet peak"] == "45.0%", by_name
    assert "The MFU target (>= 45% bf16) is read against the datasheet peak." in out.getvalue()


def write_benchmark_json(tmp_path) -> tuple[Path, Path]:
    """An e2e.py and an fp8.py JSON as the scripts write them on an H100 (the ~1B shape's settings)."""
    from benchmarks import e2e

    settings = e2e.GPU_SHAPES["~1B (22 x 2048)"] + e2e.GPU_COMMON + e2e.RUN_COMMON + ["train.steps=10"]
    e2e_json = tmp_path / "e2e.json"
    e2e_json.write_text(json.dumps({"device": H100, "measured_peak_tflops": 809.6,
                                    "measured_peak_basis": "measured 8192^3 bf16 GEMM", "rows": [
        {"shape": "~1B (22 x 2048)", "trainer": "engine", "overrides": settings, "exit": 0, "step_time_s": 2.0,
         "tflops_per_s": 445.275, "mfu": 0.55, "peak_memory_gb": 40.0},
        {"shape": "~1B (22 x 2048)", "trainer": "HF sdpa", "exit": 0, "step_time_s": 3.0, "tflops_per_s": 300.0}]}))
    fp8_json = tmp_path / "fp8.json"  # fp8.py records MFU against the measured peak, no TFLOP/s
    fp8_json.write_text(json.dumps({"device": H100, "rows": [
        {"variant": "local fp8 tensorwise", "overrides": settings + ["train.fp8=tensorwise"], "exit": 0,
         "step_time_s": 1.5, "mfu": 0.6, "peak_memory_gb": 42.0}]}))
    return e2e_json, fp8_json


def test_plan_measured_compares_the_plan_with_the_datasheet_mfu_and_prints_both(tmp_path):
    e2e_json, fp8_json = write_benchmark_json(tmp_path)
    env = {**os.environ, "POLAR_PEAK_TFLOPS": "800", "POLAR_PEAK_FILE": str(tmp_path / "no_cache.json")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_measured.py"), str(e2e_json),
                           str(fp8_json), "--write", str(tmp_path / "runs.json")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    # the plan predicts MFU against the datasheet peak: the measurement it is set beside is taken so too
    assert [r["mfu"] for r in runs] == pytest.approx([0.45, 0.6 * 800 / 989.5])
    assert [r["mfu_measured_peak"] for r in runs] == [0.55, 0.6]
    assert runs[1]["mfu_datasheet_fp8"] == pytest.approx(0.6 * 800 / 1979.0) and runs[0]["mfu_datasheet_fp8"] is None
    (table,) = markdown_tables(proc.stdout)
    assert table[0][3:] == ["MFU vs measured peak", "MFU vs datasheet bf16", "MFU vs datasheet fp8"]
    assert table[1][2:] == ["445", "55.0%", "45.0%", "-"] and table[2][2:] == ["480", "60.0%", "48.5%", "24.3%"]
    assert "/ 45.0 (" in proc.stdout  # the plan's MFU column: prediction / the datasheet measurement
    assert "MFU pred/meas: both against the datasheet's dense bf16 peak (the plan's basis)" in proc.stdout
    # the e2e JSON's own measured peak, and the fp8 one's from $POLAR_PEAK_TFLOPS (as the engine reads it)
    assert "MFU peaks: measured 810 TFLOP/s (measured 8192^3 bf16 GEMM, from the JSON)" in proc.stdout
    assert "MFU peaks: measured 800 TFLOP/s (POLAR_PEAK_TFLOPS=800)" in proc.stdout
    assert proc.stdout.count("is read against the datasheet peak (the conventional figure)") == 2
