"""polar score on a CUDA GPU: the next chunk read, tokenized and packed on a second thread while the device
scores this one (the default), each chunk prepared only after the one before it is scored (--no-prefetch),
and the packed batches left in pageable host memory (POLAR_SCORE_PIN_MEMORY=0; pinned by default on CUDA,
so their copies to the device are asynchronous) give the same rows byte for byte. On CPU
(tests/engine/test_score_chunks.py) the thread is checked to overlap the forward and the rows to match at
DP 1 and 2; here the forward is bf16 kernels launched on the device while the thread works, over 25
chunks. One GPU: DP 1 only."""
import json
import subprocess

import numpy as np
import torch

from engine.score import PIN_ENV, CheckpointScorer, lcp_group
from tests.engine import test_score_chunks as chunks

checkpoint = chunks.checkpoint  # its small model, made and saved on this machine's GPU


def test_rows_are_the_same_bytes_with_and_without_the_preparing_thread_and_pinned_memory(tmp_path, checkpoint):
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps(x) for x in chunks._lines(198)]
    lines[100:100] = ["not json", json.dumps(dict(chunks.SHORT, output="y" * 400))]  # a bad line, one too long
    inp.write_text("\n".join(lines) + "\n")
    summaries = []
    for name, extra, pin in (("ahead", [], "1"), ("serial", ["--no-prefetch"], "1"), ("pageable", [], "0")):
        proc = subprocess.run(chunks._cmd(checkpoint, inp, tmp_path / f"{name}.jsonl", "--chunk-lines", "8",
                                          "--seq-length", "256", "--on-error", "skip", *extra),
                              cwd=tmp_path, env={**chunks.ENV, PIN_ENV: pin}, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries += [x.rsplit("; ", 2)[0] for x in proc.stdout.splitlines() if x.startswith("scored ")]
    ahead = (tmp_path / "ahead.jsonl").read_bytes()
    assert ahead == (tmp_path / "serial.jsonl").read_bytes() == (tmp_path / "pageable.jsonl").read_bytes()
    rows = chunks._rows(tmp_path / "ahead.jsonl")
    assert [r["line"] for r in rows] == list(range(1, 201)) and "error" in rows[100] and "error" in rows[101]
    assert len({tuple(r["rewards"]) for r in rows if "rewards" in r}) > 100  # the rewards differ between lines
    assert len(summaries) == 3 and summaries[0] == summaries[1] == summaries[2], summaries


def test_a_cuda_runs_batches_are_pinned_with_the_values_of_pageable_ones(checkpoint, runtime):
    """pack() on a CUDA runtime: every non-empty tensor of every batch page-locked (an empty one, as
    the pair indices of scoring batches, has nothing to copy), on the thread that packs; the values
    those of the batches left pageable, on the host and once copied to the device."""
    scorer = CheckpointScorer(checkpoint, "byte")
    scorer.rt = runtime  # the device and nothing else: pack() loads no model
    assert scorer.pins_batches()
    ids = [np.arange(1, 9 + k, dtype=np.int32) for k in range(3)]
    lines = [lcp_group(ids), lcp_group(ids[:1]), lcp_group([np.arange(20, 60, dtype=np.int32)])]
    got, plain = scorer.pack(lines, 48), scorer.pack(lines, 48, pin=False)
    assert len(got.batches) == len(plain.batches) == 2
    fields = ("tokens", "layout", "reward_index", "cand_group", "labels", "pair_pos", "pair_neg")
    for a, b in zip(got.batches, plain.batches):
        for name in fields:
            t = getattr(a, name)
            assert t.is_pinned() == bool(t.numel()) and not getattr(b, name).is_pinned(), name
            assert torch.equal(t, getattr(b, name)), name
        on_device = a.to(runtime.device)  # non_blocking, as engine.scoring copies them
        assert all(torch.equal(getattr(on_device, name).cpu(), getattr(b, name)) for name in fields)
