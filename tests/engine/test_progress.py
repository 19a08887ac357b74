"""MFU's denominator: the card's measured bf16 peak (engine.progress.resolve_peak), cached per
card and torch version; CPU runs report no MFU."""
from __future__ import annotations

import json

import pytest
import torch

from engine.progress import PEAK_ENV, peak_tflops, resolve_peak


def test_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    cache = tmp_path / "peak.json"
    calls = []

    def measure():
        calls.append(1)
        return 812.5

    assert resolve_peak("NVIDIA H100 80GB HBM3", measure, str(cache)) == 812.5
    assert resolve_peak("NVIDIA H100 80GB HBM3", measure, str(cache)) == 812.5
    assert len(calls) == 1
    assert json.loads(cache.read_text()) == {f"NVIDIA H100 80GB HBM3 | torch {torch.__version__}": 812.5}
    assert resolve_peak("NVIDIA A100-SXM4-80GB", lambda: 290.0, str(cache)) == 290.0  # another card: measured
    assert len(json.loads(cache.read_text())) == 2


def test_environment_overrides_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "700")
    assert resolve_peak("any", lambda: pytest.fail("measured despite the override"), str(tmp_path / "p.json")) == 700.0
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(ValueError, match="POLAR_PEAK_TFLOPS='fast'"):
        resolve_peak("any", lambda: 1.0, str(tmp_path / "p.json"))


def test_unreadable_cache_is_remeasured(tmp_path, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    cache = tmp_path / "peak.json"
    cache.write_text("{not json")
    assert resolve_peak("card", lambda: 5.0, str(cache)) == 5.0
    assert json.loads(cache.read_text())[f"card | torch {torch.__version__}"] == 5.0


def test_cpu_has_no_mfu():
    assert peak_tflops(torch.device("cpu")) is None


def test_paused_time_stays_out_of_the_step_time_and_in_the_eta(monkeypatch, capsys):
    import types

    import engine.progress as progress

    clock = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    p = progress.Progress(4, 0, True, None, None, 1)
    clock[0] = 1.0
    first = p.log(1, 0.5, 0.5, 1e-3, 1.0, tokens=100, real_tokens=100, triplets=10, flops=1e9)
    with p.paused():  # an evaluation, a checkpoint
        clock[0] += 50.0
    clock[0] += 1.0
    second = p.log(2, 0.5, 0.5, 1e-3, 1.0, tokens=100, real_tokens=100, triplets=10, flops=1e9)
    assert first["step_time_s"] == second["step_time_s"] == 1.0
    assert second["tokens_per_s"] == 100.0 and second["tflops_per_s"] == 1e-3
    assert "eta 0m52s" in capsys.readouterr().out.splitlines()[-1]  # 2 steps left at 26 s each, wall time


def test_dense_flops_count_the_lm_head_when_there_is_one():
    from engine.progress import dense_flops_per_token

    backbone = dense_flops_per_token(2, 32, 64, 2, 1)
    assert dense_flops_per_token(2, 32, 64, 2, 1, lm_head_vocab=100) == backbone + 3 * 2 * 32 * 100


def test_the_spec_sheet_figure_beside_the_measured_peak_tells_card_variants_apart():
    """The training line's "(spec sheet N)" matched "H100" anywhere in the name: an H100 PCIe (756.5
    TFLOP/s dense bf16) or NVL (835.5) was shown the SXM's 989."""
    from engine.progress import spec_sheet_tflops

    assert spec_sheet_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert spec_sheet_tflops("NVIDIA H100 PCIe") == 756.5
    assert spec_sheet_tflops("NVIDIA H100 NVL") == 835.5
    assert spec_sheet_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert spec_sheet_tflops("cpu") is None
