"""`polar data build --workers N` stopped by a signal to its main process alone (`kill PID`, an
orchestrator's terminate(), the out-of-memory killer): its workers were left running for good,
holding the shard's lock, and the same command then failed with "another process is writing this
shard". A SIGTERM now cleans up as Ctrl-C does and exits 143; after a SIGKILL the workers end too."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.indexed_dataset import IndexedDataset
from engine.shard_format import DatasetFormatError
from engine.stop_signal import EXIT_SIGTERM
from polar import data_build
from tests.polar.test_data_build import ROOT, SEQ, synthetic_records, write_jsonl

RECORDS = 60
ARGS = ["--seq-length", str(SEQ), "--workers", "2", "--chunk-records", "10", "--quiet"]


@pytest.fixture()
def src(tmp_path):
    return write_jsonl(tmp_path / "r.jsonl", synthetic_records(RECORDS))


def start_stuck_build(tmp_path: Path, src: Path):
    """A build in a fresh process whose worker on chunk 3 (of 6) creates tmp_path/stuck and then
    never ends it: (the process, its worker processes) once that file is there, the build mid-way."""
    stuck = tmp_path / "stuck"
    script = ("import sys, time\n"
              "from polar import build_workers, data_build\n"
              "real = build_workers.process_chunk\n"
              "def wrapped(chunk):\n"
              "    if chunk.index == 3:\n"
              f"        open({str(stuck)!r}, 'w').close()\n"
              "        time.sleep(3600)\n"
              "    return real(chunk)\n"
              "build_workers.process_chunk = wrapped\n"
              "sys.exit(data_build.main(sys.argv[1:]))\n")
    # stderr to a file: workers left behind would hold a pipe open, and reading it would wait for them
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script, str(src), "-o", str(tmp_path / "ds"), *ARGS],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not stuck.exists():
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
        assert time.monotonic() < deadline, "the build never reached chunk 3"
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2, workers
    return proc, workers


def alive(workers: list) -> list:
    """Those of `workers` still running (a zombie has exited: it holds no file and no lock)."""
    out = []
    for p in workers:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def alive_after_killing(proc, workers: list, sig) -> list:
    """Sends `sig` to `proc` alone, waits for it, and gives `workers` up to 60 s to end: those alive then."""
    proc.send_signal(sig)
    proc.wait(timeout=120)
    deadline = time.monotonic() + 60
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(workers)


def end(proc, workers: list) -> None:
    """What a failing test leaves behind: a worker asleep for an hour."""
    for p in [*alive(workers), *([psutil.Process(proc.pid)] if proc.poll() is None else [])]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def same_command_again(tmp_path: Path, src: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "polar.cli", "data", "build", str(src), "-o", str(tmp_path / "ds"),
                           *ARGS], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert IndexedDataset(tmp_path / "ds").num_groups == RECORDS
    assert not list((tmp_path / "ds").glob("*.tmp"))


def test_sigterm_to_the_main_process_cleans_up_and_exits_143(tmp_path, src):
    proc, workers = start_stuck_build(tmp_path, src)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        err = (tmp_path / "stderr").read_text()
        assert proc.returncode == EXIT_SIGTERM, err[-2000:]
        assert "stopped by SIGTERM: nothing of the shard was written" in err, err[-2000:]
        assert not alive(workers), workers
        assert not (tmp_path / "ds").exists()  # no .bin.tmp, and the directory the build made is gone
    finally:
        end(proc, workers)
    same_command_again(tmp_path, src)


def test_workers_end_with_a_main_process_killed_and_free_the_shard(tmp_path, src):
    proc, workers = start_stuck_build(tmp_path, src)
    try:
        assert not alive_after_killing(proc, workers, signal.SIGKILL), workers
    finally:
        end(proc, workers)
    same_command_again(tmp_path, src)  # the .bin.tmp a SIGKILL leaves is no one's now: rewritten


def test_sigterm_while_a_rebuild_puts_its_shard_in_place_leaves_one_whole_shard(tmp_path, src):
    """A SIGTERM that came while close() renamed the new files over the old shard (--force) raised
    there: the new .json and .bin were in place beside the old .idx, a shard of two builds, while the
    build said 'nothing of the shard was written (a shard it was to replace, --force, is kept)'. The
    signal is now held from the first rename to the .idx's: the new shard is whole, and the build,
    done, exits 0."""
    old = write_jsonl(tmp_path / "old.jsonl", synthetic_records(RECORDS // 2, seed=1))
    build = [sys.executable, "-m", "polar.cli", "data", "build", "-o", str(tmp_path / "ds"), "--seq-length", str(SEQ),
             "--quiet"]
    assert subprocess.run([*build, str(old)], capture_output=True, timeout=300, cwd=ROOT).returncode == 0
    # the signal sent from inside the .bin's rename, as a scheduler's could come at that moment
    script = ("import os, signal, sys\n"
              "from polar import data_build\n"
              "real = os.replace\n"
              "def replace(src, dst, **kw):\n"
              "    real(src, dst, **kw)\n"
              "    if str(src).endswith('.bin.tmp'):\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "os.replace = replace\n"
              "sys.exit(data_build.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, *build[5:], "--force", str(src)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert IndexedDataset(tmp_path / "ds").num_groups == RECORDS
    assert not list((tmp_path / "ds").glob("*.tmp")) and not list((tmp_path / "ds").glob(".*"))


# A signal sent from inside the .json's rename, and the .bin's failing after it
FAILS_WITH_A_SIGNAL = ("import errno, os, signal, sys\n"
                       "from polar import data_build\n"
                       "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                       # a CI started under nohup has SIGHUP ignored, which the build rightly keeps ignored
                       "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
                       "sig, real = getattr(signal, sys.argv[1]), os.replace\n"
                       "def replace(src, dst, **kw):\n"
                       "    if str(src).endswith('.bin.tmp'):\n"
                       "        raise OSError(errno.EIO, 'Input/output error')\n"
                       "    real(src, dst, **kw)\n"
                       "    if str(src).endswith('.json.tmp'):\n"
                       "        os.kill(os.getpid(), sig)\n"
                       "os.replace = replace\n"
                       "sys.exit(data_build.main(sys.argv[2:]))\n")


@pytest.mark.parametrize("sig,code", [("SIGTERM", EXIT_SIGTERM), ("SIGHUP", -signal.SIGHUP),
                                      ("SIGINT", -signal.SIGINT)])
def test_a_signal_held_while_a_rename_fails_still_stops_the_build(tmp_path, src, sig, code):
    """A signal that came while close() put the shard in place, held to the end of the renames, was
    passed on only when they all succeeded: one failing (an I/O error, a full disk) dropped it, and a
    build stopped by a scheduler's SIGTERM exited 2 (the error's status) where launchers retry 143, a
    closed terminal's SIGHUP did not end it, and Ctrl-C was lost. Each now comes after the failure,
    which is still said (printed before SIGHUP's default action ends the process; under Ctrl-C's
    KeyboardInterrupt in its traceback)."""
    proc = subprocess.run([sys.executable, "-c", FAILS_WITH_A_SIGNAL, sig, str(src), "-o", str(tmp_path / "ds"),
                           "--seq-length", str(SEQ), "--quiet"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "putting the shard in place failed ([Errno 5] Input/output error)" in proc.stderr, proc.stderr[-3000:]
    # not the stop before any rename's "nothing of the shard was written (... is kept)": it may be gone
    assert "nothing of the shard was written" not in proc.stderr, proc.stderr[-3000:]


# Dies or is interrupted right after the k-th rename or removal of one of the shard's own names
# (.idx, .bin, .json, the rejects list): every point of a --force rebuild's putting its shard in place.
STOPPED_AT = ("import os, signal, sys\n"
              "from polar import data_build\n"
              # as a terminal's job does: a script's background job starts with SIGINT ignored
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "names, k, sig = set(sys.argv[1].split(os.pathsep)), int(sys.argv[2]), getattr(signal, sys.argv[3])\n"
              "done = []\n"
              "real_replace, real_unlink = os.replace, os.unlink\n"
              "def after(target):\n"
              "    if os.path.abspath(target) in names:\n"
              "        done.append(target)\n"
              "        if len(done) == k:\n"
              "            os.kill(os.getpid(), sig)\n"
              "def replace(src, dst, **kw):\n"
              "    real_replace(src, dst, **kw)\n"
              "    after(dst)\n"
              "def unlink(path, **kw):\n"
              "    real_unlink(path, **kw)\n"
              "    after(path)\n"
              "os.replace, os.unlink = replace, unlink\n"
              "sys.exit(data_build.main(sys.argv[4:]))\n")
SHARD = "part-00000-of-00001"
OWN = [f"{SHARD}.{x}" for x in ("idx", "bin", "json", "rejects.jsonl")]


def _shard_files(ds: Path) -> dict:
    """The shard's files in `ds` as a reader and a user see them: bytes, the .json's metadata but its
    absolute path to the rejects list (another directory's in the reference build)."""
    out = {}
    for name in OWN:
        p = ds / name
        if p.exists():
            out[name] = p.read_bytes()
    if f"{SHARD}.json" in out:
        meta = json.loads(out[f"{SHARD}.json"])
        meta.pop("rejects_file")
        out[f"{SHARD}.json"] = meta
    return out


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """Inputs of an old and a new build of the same groups (a rebuild under another seed: shard files of
    the same sizes, which a reader cannot tell apart by size) but other rejects, and the new shard's files."""
    root = tmp_path_factory.mktemp("two_builds")
    records = synthetic_records(RECORDS)
    old = write_jsonl(root / "old.jsonl", records, {3: b"{oops\n"})
    new = write_jsonl(root / "new.jsonl", records, {3: b"{oops, again\n"})
    ref = root / "ref"
    assert data_build.main([str(new), "-o", str(ref), *REBUILD, "--seed", "1"]) == 0
    return old, new, _shard_files(ref)


REBUILD = ["--seq-length", str(SEQ), "--chunk-records", "20", "--on-error", "skip", "--quiet"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("k", range(1, 6))
def test_a_rebuild_stopped_while_it_puts_its_shard_in_place_never_leaves_a_mix(tmp_path, two_builds, sig, k):
    """close() renamed the new .json and .bin over the old shard's and then the .idx, and the build
    renamed its rejects list after: Ctrl-C (KeyboardInterrupt, raised anywhere) between them left the
    old .idx beside the new .bin, which a reader opened without a word (the same sizes) and read the
    old offsets over the new tokens, or the new shard beside the old rejects list; a kill -9 there
    left the same for good. Now Ctrl-C there is held to the end of the renames (the new shard whole,
    the build done, exit 0), and after a kill -9 at any point a reader finds the old shard and its
    list, the new ones, or no shard (refused), and the same command again completes."""
    old, new, want = two_builds
    ds = tmp_path / "ds"
    assert data_build.main([str(old), "-o", str(ds), *REBUILD]) == 0
    before = _shard_files(ds)
    names = os.pathsep.join(str((ds / n).absolute()) for n in OWN)
    again = [str(new), "-o", str(ds), *REBUILD, "--seed", "1", "--force"]
    proc = subprocess.run([sys.executable, "-c", STOPPED_AT, names, str(k), sig, *again], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    if sig == "SIGINT":
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "note: Ctrl-C came as" in proc.stderr and "it is whole" in proc.stderr, proc.stderr[-2000:]
        assert _shard_files(ds) == want
        assert not list(ds.glob("*.tmp"))
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        try:
            IndexedDataset(ds)
        except DatasetFormatError as e:
            assert "no shards" in str(e), e  # the old .idx removed, the new one not there yet
        else:
            assert _shard_files(ds) in (before, want)
        assert data_build.main(again) == 0
        assert _shard_files(ds) == want
        assert not list(ds.glob("*.tmp")) and not list(ds.glob(".*"))
