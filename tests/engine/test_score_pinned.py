"""`polar score` on a CUDA device packs each chunk's batches in pinned host memory, so the copies to
the device are asynchronous (engine/score.py, CheckpointScorer.pins_batches); on CPU nothing changes.
The rows on CPU are the same bytes as before (tests/engine/test_score_chunks.py compares them across
chunkings and with --no-prefetch); tests/gpu/test_score_prefetch_gpu.py checks the pinned batches
and the rows with and without pinning on a GPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.config import ConfigError
from engine.runtime import Runtime
from engine.score import PIN_ENV, CheckpointScorer, lcp_group, pin_setting

ROOT = Path(__file__).parents[2]


def _runtime(device: str) -> Runtime:
    return Runtime(rank=0, world_size=1, local_rank=0, device=torch.device(device), tp=1, pp=1, dp=1, vpp=None)


def _scorer(rt) -> CheckpointScorer:
    """A scorer of what pack() reads (the model's positions, the pad id) and its runtime; no model."""
    scorer = object.__new__(CheckpointScorer)
    scorer.model_cfg = SimpleNamespace(max_position_embeddings=64)
    scorer.tokenizer = SimpleNamespace(pad_id=0)
    scorer.rt, scorer.pin_memory = rt, pin_setting()
    return scorer


@pytest.mark.parametrize("value,pins", [(None, True), ("1", True), ("0", False)])
def test_the_setting_pins_a_cuda_runs_batches_only(monkeypatch, value, pins):
    if value is None:
        monkeypatch.delenv(PIN_ENV, raising=False)
    else:
        monkeypatch.setenv(PIN_ENV, value)
    assert _scorer(_runtime("cuda:0")).pins_batches() is pins
    assert _scorer(_runtime("cpu")).pins_batches() is False
    assert _scorer(None).pins_batches() is False  # not started: no device yet


@pytest.mark.parametrize("value", ["yes", "", "true", " 1"])
def test_a_bad_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(PIN_ENV, value)
    with pytest.raises(ConfigError, match=rf"^{PIN_ENV}={value!r}: 1 \(the default.*\) or 0 "):
        pin_setting()


def test_polar_score_refuses_a_bad_value_before_it_reads_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "polar.cli", "score", "--checkpoint", str(tmp_path / "none"),
                           "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "out.jsonl")],
                          cwd=ROOT, env={**__import__("os").environ, PIN_ENV: "on"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"polar score: {PIN_ENV}='on': 1 (the default" in proc.stderr, proc.stderr[-3000:]


def test_a_cpu_runs_batches_are_packed_as_before():
    """On CPU pack() leaves collate's batches in pageable memory, the same values as with pin=False."""
    lines = [lcp_group([np.asarray(x, dtype=np.int32) for x in ([1, 2, 3], [1, 2, 4, 5])]),
             lcp_group([np.asarray([1, 7, 7], dtype=np.int32)])]
    scorer = _scorer(_runtime("cpu"))
    got, plain = scorer.pack(lines, 6), scorer.pack(lines, 6, pin=False)
    assert len(got.batches) == len(plain.batches) == 2
    for a, b in zip(got.batches, plain.batches):
        assert not a.tokens.is_pinned() and not a.layout.is_pinned()
        for name in ("tokens", "layout", "reward_index", "cand_group", "labels", "pair_pos", "pair_neg"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
