"""`polar data build --workers`: a worker that dies is an error naming where, never a hang, and a
worker imports no torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.indexed_dataset import IndexedDataset
from polar import build_workers
from polar.data_chunks import Chunk
from tests.polar.test_data_build import ROOT, SEQ, synthetic_records, write_jsonl


@pytest.fixture(scope="module")
def records():
    return synthetic_records(120)  # the records of test_data_build.py


def build_with_wrapped_chunks(tmp_path: Path, src: Path, body: str) -> subprocess.CompletedProcess:
    """`polar data build` into tmp_path/ds in a fresh process, 2 workers and 10 records a chunk, each
    chunk processed by a wrapper whose code is `body` (`chunk` its argument, `real` the original)."""
    script = ("import os, signal, sys\n"
              "from polar import build_workers, data_build\n"
              "real = build_workers.process_chunk\n"
              f"def wrapped(chunk):\n{body}"
              "build_workers.process_chunk = wrapped\n"
              "sys.exit(data_build.main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", script, str(src), "-o", str(tmp_path / "ds"), "--seq-length",
                           str(SEQ), "--workers", "2", "--chunk-records", "10", "--quiet"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_worker_killed_mid_build_is_an_error_naming_where_not_a_hang(tmp_path, records):
    """multiprocessing.Pool waits forever for the chunk of a worker that died (the out-of-memory
    killer): the build hung with its progress line and left a temporary file."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:60])
    proc = build_with_wrapped_chunks(tmp_path, src, "    if chunk.index == 2:\n"
                                                    "        os.kill(os.getpid(), signal.SIGKILL)\n"
                                                    "    return real(chunk)\n")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "a build worker died (killed: out of memory?)" in proc.stderr and "r.jsonl from line" in proc.stderr
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())


def test_build_workers_plan_without_importing_torch(tmp_path, records):
    """A worker only tokenizes and plans (engine.pack_plan); importing torch cost each of them
    ~2.5 s and ~250 MB before its first chunk."""
    src = write_jsonl(tmp_path / "r.jsonl", records[:40])
    proc = build_with_wrapped_chunks(tmp_path, src, "    out = real(chunk)\n"
                                                    "    if 'torch' in sys.modules:\n"
                                                    "        raise RuntimeError('a build worker imported torch')\n"
                                                    "    return out\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert IndexedDataset(tmp_path / "ds").num_groups == 40


def test_a_worker_dying_between_two_answers_is_the_same_error(monkeypatch):
    """The pool can break after one chunk's answer and before the next chunk is handed out: submit
    then raised BrokenProcessPool, a traceback instead of the error naming where (seen in CI once
    the workers no longer imported torch and answered sooner)."""
    import concurrent.futures
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    class BreaksOnThirdSubmit:
        def __init__(self, *args, **kwargs):
            self.submitted = 0

        def submit(self, fn, chunk):
            self.submitted += 1
            if self.submitted == 3:
                raise BrokenProcessPool("A child process terminated abruptly")
            done = Future()
            done.set_result(chunk.index)
            return done

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", BreaksOnThirdSubmit)
    chunks = [Chunk(i, "in.jsonl", 0, 1, 10 * i + 1, 10 * i, 10, 10) for i in range(4)]
    # chunks 0 and 1 in flight; chunk 0 answers, and handing out chunk 2 finds the pool broken
    with pytest.raises(build_workers.WorkerDied, match=r"reading in.jsonl from line 11 \(chunk 1\) or a chunk after"):
        list(build_workers.run_pool(None, chunks, workers=1))
