"""`polar score` (engine/score.py) reads and scores its input a chunk at a time and appends each
chunk to OUTPUT.partial: a run killed mid-way continues where it ended when the same command runs
again (a torn last row cut off), a rerun that would mix rewards of other settings into the partial
output is refused, and neither the next chunk prepared ahead nor DP 2 changes a row. (The rewards do
not depend on the chunking: tests/engine/test_score_packing.py.)"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.engine.score_runs import in_one_process

ROOT = Path(__file__).parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
SHORT = {"prompt": "p", "reference": "r", "output": "o"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("score_chunks") / "run"
    subprocess.run([sys.executable, "-m", "tests.polar.serve.make_checkpoint", str(run_dir)],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    return str(run_dir / "checkpoints")


def _lines(n: int) -> list:
    rng = np.random.default_rng(0)
    return [{"prompt": f"prompt {i % 7}: " + "q" * int(rng.integers(0, 40)), "reference": f"ref {i % 5}",
             "candidates": [f"answer {j} " + "a" * int(rng.integers(0, 60)) for j in range(1 + i % 3)]}
            for i in range(n)]


def _cmd(checkpoint: str, inp: Path, out: Path, *extra) -> list:
    return [sys.executable, "-m", "polar.cli", "score", "--checkpoint", checkpoint, "--input", str(inp),
            "--output", str(out), "--tokenizer", "byte", *extra]


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def _rows(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _complete_rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# the killed run: 30 chunks (a kill after the second finds it far from its end), each chunk's rows in one write
KILL_LINES, KILL_CHUNK = 120, 4

# the inputs the runs of `first_runs` stop on: a short line, another, one too long for --seq-length 256, the first
STOPPING = [SHORT, dict(SHORT, output="oo"), dict(SHORT, output="y" * 400), SHORT]
# an input edited after a row was written: the first line, then one too long, later fixed
EDITED = [SHORT, dict(SHORT, output="y" * 400)]

# polar score with its input changed right after the check of every line (as by a producer still
# writing the file; tests/engine/score_runs.py, changed): (id, the change run on the checked file's
# `path`, the exit status, the rows written or the message's file:line tail)
CHANGES = [
    # lines appended after the check are not scored: the output has the lines checked
    ("appended", """open(path, "a").write('{"prompt": "p", "reference": "r", "output": "late"}\\n')""", 0, [1, 2]),
    # a checked line rewritten as a bad one: a message naming it, not a traceback
    ("rewritten", """open(path, "w").write('{"prompt": "p", "reference": "r", "output": "o"}\\nnot json\\n')""",
     2, "2: (line): not valid JSON"),
    # a file cut short: OUTPUT was written with one row for the two lines checked, and no word said
    ("truncated", """open(path, "w").write('{"prompt": "p", "reference": "r", "output": "o"}\\n')""", 2,
     "2: the input changed after it was checked (its non-blank lines are not the ones checked)"),
]


def _written(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory, checkpoint) -> dict:
    """The runs at --nproc 1 that need nothing done before them, one after another in one process
    (tests/engine/score_runs.py), each in a folder of its own (the name's): the killed run's
    uninterrupted reference ("whole"); MIXED at DP 1 with its forwards watched (score_runs.watched), the next
    chunk prepared ahead ("ahead1") and with --no-prefetch ("serial1"); STOPPING and EDITED each
    stopped by a line too long where its chunk comes ("stopping", "edited": the check before the
    model loads left out); and each of CHANGES ("changed-ID"). {name: (the folder, the run's
    CompletedProcess)}; a test that goes on from a run's files works in its folder."""
    tmp = tmp_path_factory.mktemp("score_first_runs")
    kill_inp = _written(tmp / "whole" / "in.jsonl", _lines(KILL_LINES))
    mixed_inp = tmp / "in_mixed.jsonl"
    mixed_inp.write_text("\n".join(MIXED) + "\n")
    runs = {"whole": (_cmd(checkpoint, kill_inp, kill_inp.parent / "whole.jsonl", "--chunk-lines", str(KILL_CHUNK)),
                      None)}
    for name, extra in (("ahead", []), ("serial", ["--no-prefetch"])):
        runs[f"{name}1"] = (_cmd(checkpoint, mixed_inp, tmp / f"{name}1" / f"{name}1.jsonl", *MIXED_ARGS, *extra),
                            ["watched", str(tmp / f"{name}1" / "watched.log"), MIXED_FORWARDS])
    for name, lines in (("stopping", STOPPING), ("edited", EDITED)):
        inp = _written(tmp / name / "in.jsonl", lines)
        runs[name] = (_cmd(checkpoint, inp, inp.parent / "out.jsonl", "--chunk-lines", "1", "--seq-length", "256"),
                      ["unchecked"])
    for name, change, _, _ in CHANGES:
        inp = _written(tmp / f"changed-{name}" / "in.jsonl", [SHORT, dict(SHORT, output="oo")])
        runs[f"changed-{name}"] = (_cmd(checkpoint, inp, inp.parent / "out.jsonl", "--chunk-lines", "1"),
                                   ["changed", change])
    for name in runs:
        (tmp / name).mkdir(exist_ok=True)
    done = in_one_process(tmp, [{"argv": cmd[3:], "cwd": tmp / name, "patch": patch}
                                for name, (cmd, patch) in runs.items()], ENV)
    return {name: (tmp / name, proc) for name, proc in zip(runs, done)}


def test_a_killed_run_continues_where_it_ended_with_the_bytes_of_a_run_never_stopped(checkpoint, first_runs):
    """SIGKILL (nothing of the run's own handling takes part) after some chunks, a torn row appended:
    the rerun cuts the torn row and continues after the last whole chunk, so its chunks, and so their
    best-fit rows (CheckpointScorer.pack), are the stopped run's and the output is byte for byte that
    of a run never stopped. (That the rewards do not depend on the chunking is
    tests/engine/test_score_packing.py's one chunk against --chunk-lines 1.)"""
    tmp_path, whole = first_runs["whole"]  # the folder of the input, and the run never stopped
    assert whole.returncode == 0, whole.stderr[-3000:]

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    partial, record = Path(f"{out}.partial"), Path(f"{out}.partial.json")
    cmd = _cmd(checkpoint, inp, out, "--chunk-lines", str(KILL_CHUNK))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _complete_rows(partial) < 2 * KILL_CHUNK and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert not out.exists() and record.exists()  # OUTPUT appears only whole
    kept = _complete_rows(partial)
    assert 2 * KILL_CHUNK <= kept < KILL_LINES and kept % KILL_CHUNK == 0, kept  # a chunk: one write
    kept_bytes = partial.stat().st_size
    with open(partial, "ab") as f:  # a stop mid-write leaves a torn row
        f.write(b'{"line": 999, "rewa')

    # other settings would mix other rewards into the partial output: refused, the partial kept (the
    # rerun after it, in the same process, finds its rows and its torn row as the kill left them)
    refused, resumed = in_one_process(tmp_path, [
        {"argv": cmd[3:] + ["--max-response-length", "8"], "cwd": tmp_path},
        {"argv": cmd[3:] + ["--progress-s", "0"], "cwd": tmp_path}], ENV)  # not a setting a rerun is checked against
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"{partial} was written by a run with other settings (max_response_length: 4096 -> 8)" in refused.stderr
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # counted from where it resumed: the first progress line is within the first chunk it scores
    progress = re.findall(r"scoring: (\d+)/([\d,]+) lines \| ", resumed.stdout)
    assert progress and {t for _, t in progress} == {f"{KILL_LINES - kept:,}"}, resumed.stdout[-2000:]
    assert int(progress[0][0]) <= KILL_CHUNK, progress
    assert f"resuming: {kept:,} of {KILL_LINES} lines are already scored in {partial}" in resumed.stdout, \
        resumed.stdout
    assert f"its last row (19 bytes at byte {kept_bytes}) is incomplete" in resumed.stderr, resumed.stderr[-3000:]
    assert f"after the {kept:,} a stopped run had scored" in resumed.stdout
    assert not partial.exists() and not record.exists()
    assert [r["line"] for r in _rows(out)] == list(range(1, KILL_LINES + 1))
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_a_line_past_the_bound_after_some_chunks_keeps_them_for_the_rerun(checkpoint, first_runs):
    """Under --on-error fail a line too long for the packed sequence stops the run before the model
    loads, no row written (tests/engine/test_score_split.py, the line whose one output passes the
    sequence length); where that check did not find it, where its chunk comes, the chunks before it
    staying in the partial output. A second copy started while the first still writes (a requeued
    job) leaves the first copy's torn last row alone; a rerun with --on-error skip (which changes no
    reward) continues after the whole rows."""
    import fcntl

    # STOPPING without the check before the load: the line too long is found where its chunk comes
    tmp_path, stopped = first_runs["stopping"]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    partial = Path(f"{out}.partial")
    cmd = _cmd(checkpoint, inp, out, "--chunk-lines", "1", "--seq-length", "256")
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert ("in.jsonl:3: an output takes" in stopped.stderr
            and f"the 2 lines before it are kept in {out}.partial, and a rerun continues after them"
            in stopped.stderr), stopped.stderr[-3000:]
    assert [r["line"] for r in _rows(partial)] == [1, 2]

    with open(partial, "ab") as f:
        f.write(b'{"line": 3, "rewa')  # the first copy mid-write, holding the lock
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        before = partial.read_bytes()
        second = _run(cmd + ["--on-error", "skip"], tmp_path)
        # a cut of that row under the first copy lost the rows it went on to write past the cut
        assert second.returncode == 2 and "another polar score is writing this output" in second.stderr, \
            second.stderr[-3000:]
        assert partial.read_bytes() == before

    skipped = _run(cmd + ["--on-error", "skip"], tmp_path)  # the first copy has ended, its row torn
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "resuming: 2 of 4 lines" in skipped.stdout and "is incomplete" in skipped.stderr, skipped.stderr[-3000:]
    rows = _rows(out)
    assert [r["line"] for r in rows] == [1, 2, 3, 4] and "more than --seq-length 256" in rows[2]["error"]
    assert rows[0]["reward"] == pytest.approx(rows[3]["reward"], abs=1e-5)  # the same line, other runs


# polar score run four times in one process (polar.cli at --nproc 1 runs engine.score in the caller's
# process): stopped by a SIGTERM before its first row, by a line too long where its chunk comes (its
# check before the model loads left out), by that check, then run with --on-error skip
IN_ONE_PROCESS = """
import os
import signal
import sys

import polar.score_length_check
from polar.cli import main

checked = polar.score_length_check.first_too_long
polar.score_length_check.first_too_long = lambda *args: os.kill(os.getpid(), signal.SIGTERM)
codes = [main(sys.argv[1:])]
print("left after the stop:", sorted(os.listdir(".")))
polar.score_length_check.first_too_long = lambda *args: None
codes.append(main(sys.argv[1:]))
polar.score_length_check.first_too_long = checked
codes += [main(sys.argv[1:]), main(sys.argv[1:] + ["--on-error", "skip"])]
print("exit statuses", codes)
"""


def test_runs_that_fail_let_go_of_the_output_for_the_next_run_in_their_process(tmp_path, checkpoint):
    """The partial output's lock was held from a failed or stopped run's RowWriter until the process
    ended: a caller in the same process retrying (a script, a notebook) was refused its own output,
    "another polar score is writing this output". A stop before the first row left an empty partial
    output and its record, and said "0 of 4 lines are kept" in it."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [SHORT, dict(SHORT, output="oo"), dict(SHORT, output="y" * 400), SHORT]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    script = tmp_path / "in_one_process.py"
    script.write_text(IN_ONE_PROCESS)
    proc = _run([sys.executable, str(script), *_cmd(checkpoint, inp, out, "--chunk-lines", "1", "--seq-length",
                                                    "256")[3:]], tmp_path)
    assert proc.returncode == 0 and "exit statuses [143, 2, 2, 0]" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    # a stop before the first row: nothing kept, and no empty partial output and record left to say otherwise
    assert "interrupted by SIGTERM: before the scoring began; the same command starts it" in proc.stderr, \
        proc.stderr[-3000:]
    assert "left after the stop: ['in.jsonl', 'in_one_process.py']" in proc.stdout, proc.stdout
    assert "another polar score is writing this output" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(f"{inp}:3: ") == 2 and proc.stdout.count("resuming: 2 of 4 lines") == 2, \
        proc.stdout + proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["line"] for r in rows] == [1, 2, 3, 4] and "more than --seq-length 256" in rows[2]["error"]


@pytest.mark.parametrize("inp_name,out_name", [("in.jsonl", "in.jsonl"), ("in.jsonl.partial", "in.jsonl")],
                         ids=["the-input", "its-partial-file"])
def test_an_output_that_would_replace_the_input_is_refused(tmp_path, checkpoint, inp_name, out_name, capsys):
    """The rewards were renamed over the input they came from (or appended to it, as the partial file).
    `polar score` in this process (polar.cli, as the command runs it at --nproc 1): the refusal comes
    before any process group or model, so there is nothing a process of its own would add."""
    from polar.cli import main

    inp = tmp_path / inp_name
    inp.write_text(json.dumps(SHORT) + "\n")
    code = main(_cmd(checkpoint, inp, tmp_path / out_name)[3:])
    err = capsys.readouterr().err
    assert code == 2 and "name another" in err, err[-3000:]  # an exception would fail the test itself
    assert json.loads(inp.read_text()) == SHORT


def test_an_edited_input_is_not_continued(checkpoint, first_runs):
    # a row written before the run stops (EDITED, the check before the load left out): what a rerun on
    # the edited input would mix with its own
    tmp_path, stopped = first_runs["edited"]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    assert stopped.returncode == 2 and _complete_rows(Path(f"{out}.partial")) == 1, stopped.stderr[-3000:]
    inp.write_text(json.dumps(SHORT) + "\n" + json.dumps(dict(SHORT, output="fixed")) + "\n")
    again = _run(_cmd(checkpoint, inp, out, "--chunk-lines", "1", "--seq-length", "256"), tmp_path)
    assert again.returncode == 2 and "was written by a run with other settings (input_bytes:" in again.stderr, \
        again.stderr[-3000:]
    assert f"delete {out}.partial and {out}.partial.json to score from the first line" in again.stderr


@pytest.mark.parametrize("name,code,rows", [(name, code, rows) for name, _, code, rows in CHANGES],
                         ids=[name for name, *_ in CHANGES])
def test_an_input_changed_after_its_check(first_runs, name, code, rows):
    """Two lines, the input changed as CHANGES says right after the check of every line."""
    tmp_path, proc = first_runs[f"changed-{name}"]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    if isinstance(rows, list):
        assert [r["line"] for r in _rows(out)] == rows
    else:
        assert (f"{inp}:{rows}" in proc.stderr and "the input changed after it was checked" in proc.stderr
                and f"kept in {out}.partial" in proc.stderr and not out.exists()), proc.stderr[-3000:]
        # line 2's chunk was found bad while line 1's was scored: line 1's row is written all the same
        assert [r["line"] for r in _rows(Path(f"{out}.partial"))] == [1]


# 15 lines, 5 chunks of 3 that each hold a line to score: a bad line and one too long among them, the
# same short line twice, and a preference record (chosen/rejected) last, a line kind of its own
MIXED = [json.dumps(x) for x in _lines(10)]
MIXED[4:4] = ["not json", json.dumps(dict(SHORT, output="y" * 400)), json.dumps(SHORT)]
MIXED.append(json.dumps(SHORT))
MIXED.append(json.dumps({"prompt": "p", "reference": "r", "chosen": "good", "rejected": "bad"}))
MIXED_CHUNK, MIXED_FORWARDS = 3, 5
MIXED_ARGS = ("--chunk-lines", str(MIXED_CHUNK), "--seq-length", "256", "--on-error", "skip")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, checkpoint, first_runs) -> dict:
    """MIXED scored at DP 1 and 2 (--seq-length 256, --on-error skip), each with the next chunk
    prepared ahead (the default) and with --no-prefetch: {(nproc, "ahead" or "serial"): the run's
    stdout, output bytes and, at DP 1, what its watched forwards saw (tests/engine/score_runs.py,
    watched)}. One set of runs for the tests below, each reading its own property off them; DP 1's
    are among first_runs, DP 2's `polar score --nproc 2`."""
    tmp = tmp_path_factory.mktemp("score_mixed")
    inp = tmp / "in.jsonl"
    inp.write_text("\n".join(MIXED) + "\n")
    runs = {}
    for name, extra in (("ahead", []), ("serial", ["--no-prefetch"])):
        folder, proc = first_runs[f"{name}1"]
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[1, name] = {"stdout": proc.stdout, "bytes": (folder / f"{name}1.jsonl").read_bytes(),
                         "watched": (folder / "watched.log").read_text().split()}
        out = tmp / f"{name}2.jsonl"
        proc = _run(_cmd(checkpoint, inp, out, *MIXED_ARGS, "--nproc", "2", *extra), tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[2, name] = {"stdout": proc.stdout, "bytes": out.read_bytes(), "watched": None}
    return runs


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_rows_are_byte_for_byte_those_of_chunks_prepared_one_after_another(mixed, nproc):
    """--no-prefetch (every chunk read, tokenized and packed in the main thread after the one before
    it is scored) and the default give the same bytes, bad and too-long lines included, at DP 1 and 2."""
    ahead, serial = mixed[nproc, "ahead"], mixed[nproc, "serial"]
    assert ahead["bytes"] == serial["bytes"]
    rows = [json.loads(x) for x in ahead["bytes"].decode().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 16)) and "error" in rows[4] and "error" in rows[5]
    # the summary without the time and the output's name
    summaries = [x.rsplit("; ", 2)[0] for run in (ahead, serial) for x in run["stdout"].splitlines()
                 if x.startswith("scored ")]
    assert len(summaries) == 2 and summaries[0] == summaries[1] and f"dp={nproc}; " in summaries[0], summaries


def test_two_replicas_score_their_shares_and_agree_on_a_line_too_long(mixed):
    """At DP 2 each replica tokenizes and scores its own share of a chunk's lines; the rewards are
    one process's, and a line too long for the packed sequence, found by one replica, is an error row
    under --on-error skip, the other rows' rewards untouched. (Under --on-error fail such a line
    stops both replicas with one message before the model loads:
    tests/engine/test_score_split.py, two ranks sharing the check before the load.)"""
    one, two = (mixed[n, "ahead"] for n in (1, 2))
    assert "dp=2" in two["stdout"]
    # the short line twice, the one too long, the record's chosen and rejected
    items = sum(len(x["candidates"]) for x in _lines(10)) + 5
    cut = [[x for x in run["stdout"].splitlines() if x.startswith("the client's truncation")] for run in (one, two)]
    assert cut[0] == cut[1] and f"of {items} item(s)" in cut[1][0], cut  # the replicas' counts summed
    got_rows, want_rows = ([json.loads(x) for x in run["bytes"].decode().splitlines()] for run in (two, one))
    assert [r["line"] for r in got_rows] == [r["line"] for r in want_rows] == list(range(1, 16))
    for got, want in zip(got_rows, want_rows):
        assert got.keys() == want.keys()
        if "rewards" in want:
            np.testing.assert_allclose(got["rewards"], want["rewards"], rtol=1e-5, atol=1e-6)
    assert "more than --seq-length 256" in got_rows[5]["error"], got_rows[5]
    assert got_rows[6]["reward"] == pytest.approx(got_rows[13]["reward"], abs=1e-5)  # the same line
    assert [got_rows[14][k] for k in ("chosen_reward", "rejected_reward")] == got_rows[14]["rewards"], got_rows[14]
    assert "1 line(s) longer than --seq-length 256, written as error lines" in two["stdout"], two["stdout"]


def test_the_next_chunk_is_prepared_while_the_model_scores_this_one(mixed):
    """The host's work on chunk i+1 (reading, the client's tokenization, packing) overlaps the
    forward of chunk i: the device does not wait for it between chunks. Seen from inside a real
    run: each forward but the last waits (30 s at most) for the next chunk's tokenization to start;
    with --no-prefetch none sees it (and the rows are byte for byte the same: the test above)."""
    last = MIXED_FORWARDS - 1
    assert mixed[1, "ahead"]["watched"] == ["overlapped"] * last + ["last"], mixed[1, "ahead"]["watched"]
    assert mixed[1, "serial"]["watched"] == ["not-overlapped"] * last + ["last"], mixed[1, "serial"]["watched"]
