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
