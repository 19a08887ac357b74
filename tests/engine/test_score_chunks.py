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


def test_a_killed_run_continues_where_it_ended_with_the_bytes_of_a_run_never_stopped(tmp_path, checkpoint):
    """SIGKILL (nothing of the run's own handling takes part) after some chunks, a torn row appended:
    the rerun cuts the torn row and continues after the last whole chunk, so its chunks, and so their
    best-fit rows (CheckpointScorer.pack), are the stopped run's and the output is byte for byte that
    of a run never stopped. (That the rewards do not depend on the chunking is
    tests/engine/test_score_packing.py's one chunk against --chunk-lines 1.)"""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in _lines(KILL_LINES)))
    whole = _run(_cmd(checkpoint, inp, tmp_path / "whole.jsonl", "--chunk-lines", str(KILL_CHUNK)), tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "out.jsonl"
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
    with open(partial, "ab") as f:  # a stop mid-write leaves a torn row
        f.write(b'{"line": 999, "rewa')

    # other settings would mix other rewards into the partial output: refused, the partial kept
    refused = _run(cmd + ["--max-response-length", "8"], tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"{partial} was written by a run with other settings (max_response_length: 4096 -> 8)" in refused.stderr
    assert _complete_rows(partial) == kept

    resumed = _run(cmd + ["--progress-s", "0"], tmp_path)  # not a setting a rerun is checked against
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # counted from where it resumed: the first progress line is within the first chunk it scores
    progress = re.findall(r"scoring: (\d+)/([\d,]+) lines \| ", resumed.stdout)
    assert progress and {t for _, t in progress} == {f"{KILL_LINES - kept:,}"}, resumed.stdout[-2000:]
    assert int(progress[0][0]) <= KILL_CHUNK, progress
    assert f"resuming: {kept:,} of {KILL_LINES} lines are already scored in {partial}" in resumed.stdout, \
        resumed.stdout
    assert "its last row (19 bytes at byte" in resumed.stderr and "is incomplete" in resumed.stderr
    assert f"after the {kept:,} a stopped run had scored" in resumed.stdout
    assert not partial.exists() and not record.exists()
    assert [r["line"] for r in _rows(out)] == list(range(1, KILL_LINES + 1))
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


# polar score without its check of every line against --seq-length before the model loads
# (polar.score_length_check.first_too_long): a line too long is then found where its chunk is scored,
# the backstop for a line that check did not find
UNCHECKED = """
import sys

import engine.score
import polar.score_length_check

polar.score_length_check.first_too_long = lambda *args: None
sys.exit(engine.score.main(sys.argv[1:]))
"""


def _unchecked(tmp_path: Path, cmd: list) -> subprocess.CompletedProcess:
    script = tmp_path / "unchecked.py"
    script.write_text(UNCHECKED)
    return _run([sys.executable, str(script), *cmd[4:]], tmp_path)


def test_a_line_past_the_bound_after_some_chunks_keeps_them_for_the_rerun(tmp_path, checkpoint):
    """Under --on-error fail a line too long for the packed sequence stops the run before the model
    loads, no row written (tests/engine/test_score_split.py, the line whose one output passes the
    sequence length); where that check did not find it, where its chunk comes, the chunks before it
    staying in the partial output. A second copy started while the first still writes (a requeued
    job) leaves the first copy's torn last row alone; a rerun with --on-error skip (which changes no
    reward) continues after the whole rows."""
    import fcntl

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    partial = Path(f"{out}.partial")
    lines = [SHORT, dict(SHORT, output="oo"), dict(SHORT, output="y" * 400), SHORT]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cmd = _cmd(checkpoint, inp, out, "--chunk-lines", "1", "--seq-length", "256")
    stopped = _unchecked(tmp_path, cmd)
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
# process): stopped by a SIGTERM before its first row, by a line too long where its chunk comes
# (UNCHECKED), by the check that finds it before the model loads, then run with --on-error skip
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


def test_an_edited_input_is_not_continued(tmp_path, checkpoint):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(SHORT) + "\n" + json.dumps(dict(SHORT, output="y" * 400)) + "\n")
    # a row written before the run stops: what a rerun on the edited input would mix with its own
    stopped = _unchecked(tmp_path, _cmd(checkpoint, inp, out, "--chunk-lines", "1", "--seq-length", "256"))
    assert stopped.returncode == 2 and _complete_rows(Path(f"{out}.partial")) == 1, stopped.stderr[-3000:]
    inp.write_text(json.dumps(SHORT) + "\n" + json.dumps(dict(SHORT, output="fixed")) + "\n")
    again = _run(_cmd(checkpoint, inp, out, "--chunk-lines", "1", "--seq-length", "256"), tmp_path)
    assert again.returncode == 2 and "was written by a run with other settings (input_bytes:" in again.stderr, \
        again.stderr[-3000:]
    assert f"delete {out}.partial and {out}.partial.json to score from the first line" in again.stderr


# polar score with its input changed right after the check of every line (as by a producer still
# writing the file): `change` runs on the checked file's path
CHANGED = """
import sys
import polar.score_input as si
from engine.score import main

checked = si.survey_score_input


def survey(path, on_error="fail"):
    found = checked(path, on_error)
    {change}
    return found


si.survey_score_input = survey
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("change,code,rows", [
    # lines appended after the check are not scored: the output has the lines checked
    ("""open(path, "a").write('{"prompt": "p", "reference": "r", "output": "late"}\\n')""", 0, [1, 2]),
    # a checked line rewritten as a bad one: a message naming it, not a traceback
    ("""open(path, "w").write('{"prompt": "p", "reference": "r", "output": "o"}\\nnot json\\n')""", 2,
     "2: (line): not valid JSON"),
    # a file cut short: OUTPUT was written with one row for the two lines checked, and no word said
    ("""open(path, "w").write('{"prompt": "p", "reference": "r", "output": "o"}\\n')""", 2,
     "2: the input changed after it was checked (its non-blank lines are not the ones checked)"),
], ids=["appended", "rewritten", "truncated"])
def test_an_input_changed_after_its_check(tmp_path, checkpoint, change, code, rows):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(SHORT) + "\n" + json.dumps(dict(SHORT, output="oo")) + "\n")
    script = tmp_path / "changed.py"
    script.write_text(CHANGED.format(change=change))
    proc = _run([sys.executable, str(script), *_cmd(checkpoint, inp, out, "--chunk-lines", "1")[4:]], tmp_path)
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


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, checkpoint) -> dict:
    """MIXED scored at DP 1 and 2 (--seq-length 256, --on-error skip), each with the next chunk
    prepared ahead (the default) and with --no-prefetch: {(nproc, "ahead" or "serial"): the run's
    stdout, output bytes and, at DP 1, what its watched forwards saw (WATCHED)}. One set of runs
    for the tests below, each reading its own property off them."""
    tmp = tmp_path_factory.mktemp("score_mixed")
    inp, script = tmp / "in.jsonl", tmp / "watched.py"
    inp.write_text("\n".join(MIXED) + "\n")
    script.write_text(WATCHED)
    runs = {}
    for nproc in (1, 2):
        for name, extra in (("ahead", []), ("serial", ["--no-prefetch"])):
            out, log = tmp / f"{name}{nproc}.jsonl", tmp / f"{name}{nproc}.log"
            cmd = _cmd(checkpoint, inp, out, "--chunk-lines", str(MIXED_CHUNK), "--seq-length", "256", "--on-error",
                       "skip", "--nproc", str(nproc), *extra)
            if nproc == 1:  # engine.score in a process of its own, as `polar score` runs it at --nproc 1
                cmd = [sys.executable, str(script), str(log), str(MIXED_FORWARDS), *cmd[4:]]
            proc = _run(cmd, tmp)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[nproc, name] = {"stdout": proc.stdout, "bytes": out.read_bytes(),
                                 "watched": log.read_text().split() if nproc == 1 else None}
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


# polar score with its forward watched: does the next chunk's tokenization start while it runs? (argv:
# the log, the chunks the run scores, polar score's arguments)
WATCHED = """
import sys
import threading

import engine.scoring
from engine.score import CheckpointScorer, main

log, chunks, threads, changed = open(sys.argv[1], "w"), int(sys.argv[2]), [], threading.Condition()
groups, forward = CheckpointScorer.groups, engine.scoring.score
forwards = 0


def watched_groups(self, *a, **k):
    with changed:
        threads.append(threading.current_thread() is threading.main_thread())
        changed.notify_all()
    return groups(self, *a, **k)


def watched_forward(*a, **k):
    global forwards
    out = forward(*a, **k)
    forwards += 1
    if forwards == chunks:  # no chunk after this one
        log.write("last\\n")
    elif all(threads):  # every chunk tokenized in the main thread, which is here: nothing overlaps
        log.write("not-overlapped\\n")
    else:
        with changed:
            ahead = changed.wait_for(lambda: len(threads) > forwards, timeout=30)
        log.write("overlapped\\n" if ahead else "not-overlapped\\n")
    log.flush()
    return out


CheckpointScorer.groups, engine.scoring.score = watched_groups, watched_forward
sys.exit(main(sys.argv[3:]))
"""
