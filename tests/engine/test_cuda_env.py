"""engine/cuda_env.py: CUDA_DEVICE_MAX_CONNECTIONS=1 for TP > 1 on GPUs before compute capability
10, set by the entry points before their first CUDA call; never over the user's own value. The
capability is read from a real nvidia-smi subprocess (a script standing in for it here)."""
from __future__ import annotations

import os
import stat

import pytest

from engine.cuda_env import VARIABLE, nvidia_smi_capability, order_tp_launches


def fake_nvidia_smi(directory, output: str, code: int = 0) -> str:
    path = directory / "nvidia-smi"
    path.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(directory)


@pytest.mark.parametrize("tp,cc,env,want", [
    (2, 9.0, {}, "1"),  # H100
    (8, 8.0, {}, "1"),  # A100
    (1, 9.0, {}, None),  # no tensor parallelism: nothing to order
    (2, 10.0, {}, None),  # Blackwell: the driver's default
    (2, None, {}, None),  # no GPU
    (2, 9.0, {VARIABLE: "8"}, None),  # the user's own value stays
])
def test_set_only_where_it_applies(tp, cc, env, want):
    environ = dict(env)
    assert order_tp_launches(tp, environ, capability=lambda: cc) == want
    assert environ.get(VARIABLE) == (want or env.get(VARIABLE))


@pytest.mark.parametrize("output,code,want", [("9.0\n", 0, 9.0), ("9.0\n9.0\n", 0, 9.0), ("10.0\n", 0, 10.0),
                                              ("", 0, None), ("[N/A]\n", 0, None), ("9.0\n", 9, None)])
def test_the_capability_is_read_from_nvidia_smi(tmp_path, monkeypatch, output, code, want):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, output, code) + os.pathsep + os.environ["PATH"])
    assert nvidia_smi_capability() == want


def test_without_nvidia_smi_there_is_no_capability(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert nvidia_smi_capability() is None


@pytest.mark.parametrize("entry,argv", [
    ("engine.pretrain", ["--check-config", "parallel.tp=2"]),
    ("engine.score", ["--checkpoint", "missing", "--input", "missing.jsonl", "--output", "o.jsonl", "--tp", "2"]),
    ("engine.evaluate", ["--checkpoint", "missing", "--input", "missing.jsonl", "--tp", "2"]),
    ("polar.serve.server", ["--checkpoint", "missing", "--tp", "2"]),
])
def test_entry_points_set_it_before_anything_else(tmp_path, monkeypatch, entry, argv):
    """Each stops at a missing file or a layout this one process cannot run, after the setting."""
    import importlib

    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, "9.0\n") + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv(VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    assert importlib.import_module(entry).main(argv) != 0
    assert os.environ.get(VARIABLE) == "1"
